{{/*
The worker chart's own helpers; the shared ones (names, labels, images, pod security, proxy,
CA bundle, placement) come from the diskflow-common library chart.
*/}}

{{/* Seconds an install task needs besides its build timeout (checks before the guest starts,
the domain's teardown, the acknowledgement): pipelines.tasks.BUILD_MARGIN_SECONDS. */}}
{{- define "diskflow-worker.buildMargin" -}}600{{- end -}}

{{/* Refuse values that cannot work, naming them. */}}
{{- define "diskflow-worker.checks" -}}
{{- $worker := .Values.worker -}}
{{- $margin := include "diskflow-worker.buildMargin" . | int -}}
{{- if and .Values.redis.enabled .Values.broker.existingSecret -}}
{{- fail "diskflow-worker: redis.enabled and broker.existingSecret are both set: use the bundled Redis (redis.enabled=true) or your own broker (broker.existingSecret, with redis.enabled=false), not both" -}}
{{- end -}}
{{- if not (or .Values.redis.enabled .Values.broker.existingSecret) -}}
{{- fail "diskflow-worker: no broker: set redis.enabled=true (a bundled Redis) or broker.existingSecret (a Secret whose key broker.key holds the broker's redis:// URL)" -}}
{{- end -}}
{{- if lt (int $worker.visibilityTimeout) (add (int $worker.buildTimeout) $margin) -}}
{{- fail (printf "diskflow-worker: worker.visibilityTimeout (%d) must be at least worker.buildTimeout (%d) + %d s (what an install task needs besides its build), or Redis hands a build still running to a second worker: lower worker.buildTimeout to %d or raise worker.visibilityTimeout to %d" (int $worker.visibilityTimeout) (int $worker.buildTimeout) $margin (sub (int $worker.visibilityTimeout) $margin) (add (int $worker.buildTimeout) $margin)) -}}
{{- end -}}
{{- end -}}

{{/* The bundled Redis' password: the existing Secret's (kept across upgrades), else a new
one, generated once per render (memoized on the top-level context) so that the Secret and
the pods' config checksum agree. Offline rendering (helm template) finds no Secret. */}}
{{- define "diskflow-worker.redisPassword" -}}
{{- if not (hasKey $ "diskflowRedisPassword") -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "diskflow-common.name" (dict "root" . "component" "redis")) -}}
{{- $password := "" -}}
{{- if and $existing $existing.data (hasKey $existing.data "password") -}}
{{- $password = index $existing.data "password" | b64dec -}}
{{- else -}}
{{- $password = randAlphaNum 32 -}}
{{- end -}}
{{- $_ := set $ "diskflowRedisPassword" $password -}}
{{- end -}}
{{- get $ "diskflowRedisPassword" -}}
{{- end -}}

{{/* The bundled Redis' Secret data: password, the broker URL, and redis-server's config
(mounted at the image's config path; the password never goes into argv). */}}
{{- define "diskflow-worker.redisSecretData" -}}
{{- $password := include "diskflow-worker.redisPassword" . -}}
{{- $service := include "diskflow-common.name" (dict "root" . "component" "redis") -}}
password: {{ $password | b64enc | quote }}
url: {{ printf "redis://:%s@%s:6379/0" $password $service | b64enc | quote }}
diskflow.conf: {{ include "diskflow-worker.redisConf" $password | b64enc | quote }}
{{- end -}}

{{- define "diskflow-worker.redisConf" -}}
# diskflow's Celery broker: password required, no persistence (a lost queue is rebuilt by
# resubmitting), foreground, logs to stdout.
bind 0.0.0.0
port 6379
protected-mode yes
requirepass {{ . }}
save ""
appendonly no
daemonize no
supervised no
logfile ""
pidfile ""
dir /tmp
{{ end -}}

{{/* Annotations that roll a pod when the bundled Redis' config (or password) changes. */}}
{{- define "diskflow-worker.configChecksum" -}}
{{- if .Values.redis.enabled -}}
{{- toJson (dict "checksum/redis-config" (include "diskflow-worker.redisSecretData" . | sha256sum)) -}}
{{- else -}}
{}
{{- end -}}
{{- end -}}

{{/* The broker URL, as an EnvVar's valueFrom. */}}
{{- define "diskflow-worker.brokerRef" -}}
secretKeyRef:
{{- if .Values.redis.enabled }}
  name: {{ include "diskflow-common.name" (dict "root" . "component" "redis") }}
  key: url
{{- else }}
  name: {{ .Values.broker.existingSecret | quote }}
  key: {{ .Values.broker.key | quote }}
{{- end }}
{{- end -}}

{{/* Publishing credentials as EnvVars from Secrets: S3's (both keys required) and an HTTP
store's (each optional: user + password, or a token, or all three). */}}
{{- define "diskflow-worker.publishEnv" -}}
{{- with .Values.publish.s3 }}
{{- if .existingSecret }}
{{- range $name, $key := dict "AWS_ACCESS_KEY_ID" .accessKeyIdKey "AWS_SECRET_ACCESS_KEY" .secretAccessKeyKey }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.publish.s3.existingSecret | quote }}
      key: {{ $key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.publish.http }}
{{- if .existingSecret }}
{{- range $name, $key := dict "DISKFLOW_PUBLISH_USER" .userKey "DISKFLOW_PUBLISH_PASSWORD" .passwordKey "DISKFLOW_PUBLISH_TOKEN" .tokenKey }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.publish.http.existingSecret | quote }}
      key: {{ $key | quote }}
      optional: true
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
