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

{{/* repository@digest pins the exact image; else repository:tag. */}}
{{- define "inferscope.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The NVIDIA driver mount of nvidia.preset as JSON: host (host directory, "" for
no mount), path (where the agent looks: /usr/local/nvidia/lib64 is in its NVML
search, and so are /run/nvidia/driver/usr/lib/x86_64-linux-gnu and
/run/nvidia/driver/usr/lib64 for the GPU operator's driver root) and
propagation. nvidia.driverLibDir replaces the preset's host directory.
*/}}
{{- define "inferscope.nvidiaMount" -}}
{{- $lib := "/usr/local/nvidia/lib64" }}
{{- $presets := dict
  "debian" (dict "host" "/usr/lib/x86_64-linux-gnu" "path" $lib)
  "ubuntu" (dict "host" "/usr/lib/x86_64-linux-gnu" "path" $lib)
  "rhel" (dict "host" "/usr/lib64" "path" $lib)
  "amazonlinux" (dict "host" "/usr/lib64" "path" $lib)
  "cos" (dict "host" "/home/kubernetes/bin/nvidia/lib64" "path" $lib)
  "gpu-operator" (dict "host" "/run/nvidia/driver" "path" "/run/nvidia/driver" "propagation" "HostToContainer")
  "cdi" (dict "host" "" "path" "")
  "none" (dict "host" "" "path" "") }}
{{- $preset := get $presets .Values.nvidia.preset }}
{{- if not $preset }}
{{- fail (printf "nvidia.preset %q: must be one of %s" .Values.nvidia.preset (keys $presets | sortAlpha | join ", ")) }}
{{- end }}
{{- $mount := deepCopy $preset }}
{{- with .Values.nvidia.driverLibDir }}
{{- $_ := set $mount "host" . }}
{{- if not $mount.path }}{{ $_ := set $mount "path" $lib }}{{ end }}
{{- end }}
{{- toJson $mount }}
{{- end }}

{{/*
Node labels any one of which marks a GPU node (nodeSelectorTerms are ORed), as
a node affinity; the user's affinity replaces it.
*/}}
{{- define "inferscope.affinity" -}}
{{- if .Values.affinity }}
{{- toYaml .Values.affinity }}
{{- else if .Values.gpuNodeLabels }}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      {{- range .Values.gpuNodeLabels }}
      - matchExpressions:
          - key: {{ .key | quote }}
            {{- if .values }}
            operator: In
            values:
              {{- range .values }}
              - {{ . | quote }}
              {{- end }}
            {{- else }}
            operator: Exists
            {{- end }}
      {{- end }}
{{- end }}
{{- end }}

{{/*
How many of `nodes` (a NodeList from lookup) the DaemonSet selects: every
nodeSelector label and, without a custom affinity, one of gpuNodeLabels.
*/}}
{{- define "inferscope.matchingNodes" -}}
{{- $count := 0 }}
{{- range .nodes }}
{{- $labels := .metadata.labels | default dict }}
{{- $ok := true }}
{{- range $k, $v := $.root.Values.nodeSelector }}
{{- if ne (toString (get $labels $k)) (toString $v) }}{{ $ok = false }}{{ end }}
{{- end }}
{{- $any := not $.root.Values.gpuNodeLabels }}
{{- range $.root.Values.gpuNodeLabels }}
{{- if hasKey $labels .key }}
{{- if or (not .values) (has (get $labels .key) .values) }}{{ $any = true }}{{ end }}
{{- end }}
{{- end }}
{{- if and $ok $any }}{{ $count = add1 $count }}{{ end }}
{{- end }}
{{- $count }}
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

{{/*
Labels of the `helm test` pod: not the agent's selector labels, so that the
Service and the DaemonSet do not take it for an agent.
*/}}
{{- define "inferscope.testSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
{{- end }}
