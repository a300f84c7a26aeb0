{{/*
Helpers shared by the diskflow and diskflow-worker charts. Each takes a dict:
  root       the chart's top-level context (.)
  component  the component's name (controller, worker, redis)
  values     the component's values (image, resources, placement, pod metadata, extraEnv)
*/}}

{{- define "diskflow-common.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: <fullname>-<component>, or just <fullname> when
it ends in the component's name already (diskflow-worker's worker). */}}
{{- define "diskflow-common.name" -}}
{{- $full := include "diskflow-common.fullname" .root -}}
{{- if hasSuffix (printf "-%s" .component) $full -}}
{{- $full -}}
{{- else -}}
{{- printf "%s-%s" $full .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "diskflow-common.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "diskflow-common.labels" -}}
{{ include "diskflow-common.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: diskflow
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given; the tag defaults to the chart's appVersion. */}}
{{- define "diskflow-common.image" -}}
{{- $image := .values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The pod template's metadata: labels (selector + podLabels) and annotations (the
caller's extraAnnotations, e.g. a config checksum, + podAnnotations). */}}
{{- define "diskflow-common.podMetadata" -}}
labels:
  {{- include "diskflow-common.labels" . | nindent 2 }}
  {{- with .values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with merge (dict) (.extraAnnotations | default dict) (.values.podAnnotations | default dict) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod-level scheduling and pull settings shared by every component. */}}
{{- define "diskflow-common.placement" -}}
{{- with .values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Restricted Pod Security, pod level. */}}
{{- define "diskflow-common.restrictedPod" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Restricted Pod Security, container level: no capability at all (NET_RAW included). */}}
{{- define "diskflow-common.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/*
Environment every component's container gets: the proxy settings (both spellings: Python's
requests and botocore read either), the CA bundle for outgoing TLS, then the component's extraEnv.
*/}}
{{- define "diskflow-common.env" -}}
{{- include "diskflow-common.proxyEnv" .root }}
{{- if .root.Values.caBundle.configMap }}
{{- $file := printf "%s/%s" (include "diskflow-common.caDir" .) .root.Values.caBundle.key }}
{{- range list "SSL_CERT_FILE" "REQUESTS_CA_BUNDLE" "AWS_CA_BUNDLE" }}
- name: {{ . }}
  value: {{ $file | quote }}
{{- end }}
{{- end }}
{{- with .values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "diskflow-common.caDir" -}}/etc/diskflow/ca{{- end -}}

{{/* The CA bundle's volume and mount, when caBundle.configMap is set. */}}
{{- define "diskflow-common.caVolume" -}}
{{- if .root.Values.caBundle.configMap }}
- name: ca-bundle
  configMap:
    name: {{ .root.Values.caBundle.configMap | quote }}
{{- end }}
{{- end -}}

{{- define "diskflow-common.caMount" -}}
{{- if .root.Values.caBundle.configMap }}
- name: ca-bundle
  mountPath: {{ include "diskflow-common.caDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The proxy settings (.Values.proxy) as EnvVars, in both spellings (Python's requests and
botocore read either); takes the chart's top-level context. */}}
{{- define "diskflow-common.proxyEnv" -}}
{{- $proxy := .Values.proxy -}}
{{- range $name, $value := dict "HTTP_PROXY" $proxy.httpProxy "HTTPS_PROXY" $proxy.httpsProxy "NO_PROXY" $proxy.noProxy }}
{{- if $value }}
- name: {{ $name }}
  value: {{ $value | quote }}
- name: {{ lower $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- end -}}
