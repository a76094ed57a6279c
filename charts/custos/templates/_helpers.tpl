{{/* Names, labels and derived values shared by the templates. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "custos.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name: fullnameOverride, the release name when it contains the
chart name, else "<release>-<chart>". Kept to 40 characters so that the longest suffix
("-collector-headless") still fits a 63-character DNS label. */}}
{{- define "custos.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version for the helm.sh/chart label. */}}
{{- define "custos.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "custos.labels" -}}
helm.sh/chart: {{ include "custos.chart" . }}
app.kubernetes.io/name: {{ include "custos.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ default .Chart.AppVersion .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: custos
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of a component: include with (dict "ctx" $ "component" "operator"). */}}
{{- define "custos.selectorLabels" -}}
app.kubernetes.io/name: {{ include "custos.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of a component's resources: the common labels plus the component. */}}
{{- define "custos.componentLabels" -}}
{{ include "custos.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The Custos image. */}}
{{- define "custos.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The image of the injected sidecar (default: the Custos image). */}}
{{- define "custos.sidecarImage" -}}
{{- $s := .Values.operator.sidecar.image }}
{{- printf "%s:%s" (default .Values.image.repository $s.repository) (default (default .Chart.AppVersion .Values.image.tag) $s.tag) }}
{{- end }}

{{/* Operator resource names. */}}
{{- define "custos.operator.fullname" -}}
{{- printf "%s-operator" (include "custos.fullname" .) }}
{{- end }}
{{- define "custos.operator.serviceAccount" -}}
{{- include "custos.operator.fullname" . }}
{{- end }}
{{- define "custos.webhook.service" -}}
{{- printf "%s-operator-webhook" (include "custos.fullname" .) }}
{{- end }}
{{- define "custos.webhook.certSecret" -}}
{{- printf "%s-webhook-cert" (include "custos.fullname" .) }}
{{- end }}
{{- define "custos.webhook.certificate" -}}
{{- printf "%s-webhook" (include "custos.fullname" .) }}
{{- end }}
{{- define "custos.webhook.mutating" -}}
{{- printf "%s-sidecar-injector" (include "custos.fullname" .) }}
{{- end }}
{{- define "custos.webhook.validating" -}}
{{- printf "%s-policy-validator" (include "custos.fullname" .) }}
{{- end }}

{{/* DNS names of the webhook Service (the serving certificate's names). */}}
{{- define "custos.webhook.dnsNames" -}}
{{- $svc := include "custos.webhook.service" . }}
{{- $ns := .Release.Namespace -}}
- {{ $svc }}
- {{ $svc }}.{{ $ns }}
- {{ $svc }}.{{ $ns }}.svc
- {{ $svc }}.{{ $ns }}.svc.cluster.local
{{- end }}

{{/* Collector resource names. */}}
{{- define "custos.collector.fullname" -}}
{{- printf "%s-collector" (include "custos.fullname" .) }}
{{- end }}
{{- define "custos.collector.headless" -}}
{{- printf "%s-collector-headless" (include "custos.fullname" .) }}
{{- end }}

{{/* The Secret holding the collector token (key `token`): given or generated. */}}
{{- define "custos.collector.tokenSecret" -}}
{{- default (printf "%s-collector-token" (include "custos.fullname" .)) .Values.collector.auth.existingSecret }}
{{- end }}

{{/* Whether the collector talks to the Kubernetes API (alerts as Events). */}}
{{- define "custos.collector.kubeEvents" -}}
{{- if ne .Values.collector.kubeEvents "off" }}true{{ end }}
{{- end }}

{{/* The collector URL the sidecars are given: the value, else the in-chart collector. */}}
{{- define "custos.sidecar.collectorUrl" -}}
{{- if .Values.operator.sidecar.collectorUrl }}
{{- .Values.operator.sidecar.collectorUrl }}
{{- else if .Values.collector.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "custos.collector.fullname" .) .Release.Namespace (int .Values.collector.port) }}
{{- end }}
{{- end }}

{{/* "true" when the operator copies the sidecar Secrets into namespaces (syncSecrets and at
least one Secret configured), else empty. */}}
{{- define "custos.operator.syncSecrets" -}}
{{- if and .Values.operator.sidecar.syncSecrets (or (include "custos.sidecar.collectorTokenSecret" .) .Values.operator.sidecar.hashKeySecret) -}}
true
{{- end }}
{{- end }}

{{/* The collector token Secret the sidecars mount: the value, else the in-chart collector's. */}}
{{- define "custos.sidecar.collectorTokenSecret" -}}
{{- if .Values.operator.sidecar.collectorTokenSecret }}
{{- .Values.operator.sidecar.collectorTokenSecret }}
{{- else if .Values.collector.enabled }}
{{- include "custos.collector.tokenSecret" . }}
{{- end }}
{{- end }}
