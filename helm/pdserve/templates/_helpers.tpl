{{/*
Names, labels, images and the pieces every pod shares (env from config maps, Redis URL, model and
TLS volumes). Component names: router, prefill, decode, autoscaler, redis.
*/}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's objects: (dict "root" $ "component" "router") */}}
{{- define "pdserve.componentName" -}}
{{- printf "%s-%s" (include "pdserve.fullname" .root) .component -}}
{{- end -}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pdserve.labels" -}}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/part-of: pdserve
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of the release's pods, for NetworkPolicy peers: (dict "root" $ "component" "decode") */}}
{{- define "pdserve.podPeer" -}}
podSelector:
  matchLabels:
    {{- include "pdserve.selectorLabels" . | nindent 4 }}
{{- end -}}

{{/* The selector the router's Kubernetes discovery uses for a worker pool; the pool's Service carries these labels. */}}
{{- define "pdserve.discoverySelector" -}}
{{- printf "app.kubernetes.io/instance=%s,app.kubernetes.io/component=%s" .root.Release.Name .component -}}
{{- end -}}

{{/* image reference: (dict "image" .Values.images.worker "root" $) */}}
{{- define "pdserve.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* One env entry per key of a config map: (dict "prefix" "PDSERVE_ENGINE_" "values" $map).
Lists are comma-separated (the config tree's tuple syntax); whole numbers print without exponent. */}}
{{- define "pdserve.configEnv" -}}
{{- $prefix := .prefix -}}
{{- range $key, $value := .values }}
{{- $text := "" }}
{{- if kindIs "slice" $value }}
{{- $text = join "," $value }}
{{- else if and (kindIs "float64" $value) (eq $value (floor $value)) }}
{{- $text = toString (int64 $value) }}
{{- else if kindIs "invalid" $value }}
{{- $text = "none" }}
{{- else }}
{{- $text = toString $value }}
{{- end }}
- name: {{ printf "%s%s" $prefix (upper $key) }}
  value: {{ $text | quote }}
{{- end }}
{{- end -}}

{{- define "pdserve.redisEnabled" -}}
{{- if or .Values.redis.bundled.enabled .Values.redis.external.url .Values.redis.external.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* env entry with the Redis URL: (dict "root" $ "name" "PDSERVE_WORKER_REDIS_URL") */}}
{{- define "pdserve.redisUrlEnv" -}}
{{- $r := .root.Values.redis -}}
- name: {{ .name }}
{{- if $r.bundled.enabled }}
  value: {{ printf "redis://%s:6379/0" (include "pdserve.componentName" (dict "root" .root "component" "redis")) | quote }}
{{- else if $r.external.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $r.external.existingSecret }}
      key: {{ $r.external.existingSecretKey }}
{{- else }}
  value: {{ $r.external.url | quote }}
{{- end }}
{{- end -}}

{{- define "pdserve.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required with model.source=pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required with model.source=hostPath" .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- end }}
{{- end -}}

{{- define "pdserve.modelMount" -}}
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
  {{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Name of the TLS Secret a component mounts: (dict "root" $ "component" "router") */}}
{{- define "pdserve.tlsSecret" -}}
{{- if .root.Values.mtls.certManager.enabled -}}
{{- printf "%s-tls" (include "pdserve.componentName" .) -}}
{{- else -}}
{{- required "mtls.existingSecret (or mtls.certManager.enabled) is required with mtls.enabled" .root.Values.mtls.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.tlsVolume" -}}
{{- if .root.Values.mtls.enabled }}
- name: tls
  secret:
    secretName: {{ include "pdserve.tlsSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "pdserve.tlsMount" -}}
{{- if .Values.mtls.enabled }}
- name: tls
  mountPath: {{ .Values.mtls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The name every component's certificate holds and every peer checks. */}}
{{- define "pdserve.meshName" -}}
{{- default (printf "%s-mesh" (include "pdserve.fullname" .)) .Values.mtls.serverName -}}
{{- end -}}

{{- define "pdserve.tlsEnv" -}}
{{- if .Values.mtls.enabled }}
- name: PDSERVE_TLS_CERT
  value: {{ printf "%s/tls.crt" .Values.mtls.mountPath | quote }}
- name: PDSERVE_TLS_KEY
  value: {{ printf "%s/tls.key" .Values.mtls.mountPath | quote }}
- name: PDSERVE_TLS_CA
  value: {{ printf "%s/ca.crt" .Values.mtls.mountPath | quote }}
- name: PDSERVE_TLS_SERVER_NAME
  value: {{ include "pdserve.meshName" . | quote }}
{{- end }}
{{- end -}}

{{/* Writable scratch space: the root filesystem is read-only. */}}
{{- define "pdserve.tmpEnv" -}}
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end -}}

{{- define "pdserve.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end -}}

{{- define "pdserve.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end -}}

{{- define "pdserve.apiKeysSecret" -}}
{{- default (include "pdserve.componentName" (dict "root" . "component" "api-keys")) .Values.router.auth.existingSecret -}}
{{- end -}}

{{/* Checks of combinations the schema cannot express. */}}
{{- define "pdserve.validate" -}}
{{- $r := .Values.redis -}}
{{- if and $r.bundled.enabled (or $r.external.url $r.external.existingSecret) -}}
{{- fail "redis: set either redis.bundled.enabled or redis.external, not both" -}}
{{- end -}}
{{- if not (include "pdserve.redisEnabled" .) -}}
{{- fail "redis: a Redis is required (decode workers accept KV only from prefill workers registered there): enable redis.bundled or set redis.external" -}}
{{- end -}}
{{- if and (ne .Values.model.source "image") (not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.model.mountPath)) .Values.model.path)) -}}
{{- fail (printf "model.path %s must lie below model.mountPath %s" .Values.model.path .Values.model.mountPath) -}}
{{- end -}}
{{- if and .Values.mtls.enabled .Values.mtls.certManager.enabled (not .Values.mtls.certManager.issuerRef.name) -}}
{{- fail "mtls.certManager.issuerRef.name is required with mtls.certManager.enabled" -}}
{{- end -}}
{{- end -}}
