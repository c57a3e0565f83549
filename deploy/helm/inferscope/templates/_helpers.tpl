{{/* Chart name, or nameOverride. */}}
{{- define "inferscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: fullnameOverride, else the release name
when it already contains the chart name, else <release>-<chart>.
*/}}
{{- define "inferscope.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "inferscope.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "inferscope.labels" -}}
helm.sh/chart: {{ include "inferscope.chart" . }}
{{ include "inferscope.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: inferscope
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels. The Prometheus rules select job="inferscope": the monitors take
the job from app.kubernetes.io/name.
*/}}
{{- define "inferscope.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferscope.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "inferscope.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inferscope.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "inferscope.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Whether the cluster serves the Prometheus Operator's API. */}}
{{- define "inferscope.promOperator" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{/*
config.toml: .Values.config with the keys the chart owns: proc_root (the host
/proc mount in the DaemonSet) and the forensics retention values.
*/}}
{{- define "inferscope.configToml" -}}
{{- $owned := dict
  "proc_root" "/host/proc"
  "forensics" (dict
    "max_reports" .Values.forensics.maxReports
    "max_bytes" .Values.forensics.maxBytes) }}
{{- $config := mustMergeOverwrite (deepCopy .Values.config) $owned }}
{{- include "inferscope.tomlTable" (dict "table" $config "prefix" "") }}
{{- end }}

{{/*
A TOML table: its plain keys, then its sub-tables. Not toToml: Helm reads
numeric values as floats, which toToml writes as 200.0 and the agent's integer
keys refuse.
*/}}
{{- define "inferscope.tomlTable" -}}
{{- $table := .table }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := get $table $key }}
{{- if not (kindIs "map" $value) }}
{{ include "inferscope.tomlKey" $key }} = {{ include "inferscope.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := get $table $key }}
{{- if kindIs "map" $value }}
{{- $k := include "inferscope.tomlKey" $key }}
{{- $name := ternary $k (printf "%s.%s" $.prefix $k) (eq $.prefix "") }}

[{{ $name }}]
{{- include "inferscope.tomlTable" (dict "table" $value "prefix" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* A TOML key: bare when it can be, else quoted (GPU type names have spaces). */}}
{{- define "inferscope.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* A TOML value: integral numbers without a fraction, strings JSON-quoted. */}}
{{- define "inferscope.tomlValue" -}}
{{- if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}
{{- $items = append $items (include "inferscope.tomlValue" .) }}
{{- end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if kindIs "string" . }}
{{- toJson . }}
{{- else if kindIs "bool" . }}
{{- . }}
{{- else if and (kindIs "float64" .) (eq (floor .) .) }}
{{- printf "%d" (int64 .) }}
{{- else if kindIs "map" . }}
{{- fail "config: tables inside arrays are not supported" }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}
