{{- define "diskflow.serviceAccountName" -}}
{{- default (include "diskflow-common.name" (dict "root" . "component" "controller")) .Values.controller.serviceAccount.name -}}
{{- end -}}

{{/*
What the controller does in a namespace it watches: DataVolumes in (list, watch; patch their
finalizers and status), PVCs and importer pods out, the Secrets and ConfigMaps a DataVolume
names read only to learn whether they exist yet (never listed), and Events. Test:
tests/controller (every e2e test runs the operator with exactly these rules).
*/}}
{{- define "diskflow.namespacedRules" -}}
- apiGroups: ["diskflow.io"]
  resources: ["datavolumes"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["diskflow.io"]
  resources: ["datavolumes/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["create", "get", "list", "watch", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["create", "get", "list", "watch", "delete"]
- apiGroups: [""]
  resources: ["secrets", "configmaps"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* The importer pods' image: importer.image, else the controller's. */}}
{{- define "diskflow.importerImage" -}}
{{- $values := .Values.controller -}}
{{- if .Values.importer.image.repository }}{{ $values = .Values.importer }}{{ end -}}
{{- include "diskflow-common.image" (dict "root" . "values" $values) -}}
{{- end -}}
