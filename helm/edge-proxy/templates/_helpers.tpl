{{/* Chart name, overridable. */}}
{{- define "edge-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release already carries the chart name. */}}
{{- define "edge-proxy.fullname" -}}
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

{{- define "edge-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "edge-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edge-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ledger exporter's pods: another name, so nothing that selects the gateway's pods selects them. */}}
{{- define "edge-proxy.exporterSelectorLabels" -}}
app.kubernetes.io/name: {{ include "edge-proxy.name" . }}-exporter
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "edge-proxy.exporterLabels" -}}
helm.sh/chart: {{ include "edge-proxy.chart" . }}
{{ include "edge-proxy.exporterSelectorLabels" . }}
app.kubernetes.io/component: ledger-exporter
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "edge-proxy.labels" -}}
helm.sh/chart: {{ include "edge-proxy.chart" . }}
{{ include "edge-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "edge-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edge-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the JWT signing key: the operator's, or the one this chart generates once. */}}
{{- define "edge-proxy.signingKeySecret" -}}
{{- default (printf "%s-signing-key" (include "edge-proxy.fullname" .)) .Values.signingKey.existingSecret }}
{{- end }}

{{/* auth.signing_keys: the Secret's active key signs, its verify-only keys (a rotation's previous key) verify. */}}
{{- define "edge-proxy.signingKeys" -}}
{{- if and .Values.signingKey.verifyOnlyKeys (not .Values.signingKey.existingSecret) }}
{{- fail "signingKey.verifyOnlyKeys needs signingKey.existingSecret: the generated Secret holds one key" }}
{{- end }}
{{- if has .Values.signingKey.secretKey .Values.signingKey.verifyOnlyKeys }}
{{- fail "signingKey.verifyOnlyKeys lists signingKey.secretKey: the active key cannot also be verify-only" }}
{{- end }}
- {file: {{ printf "/var/run/secrets/edge-proxy/signing/%s" .Values.signingKey.secretKey | quote }}, active: true}
{{- range .Values.signingKey.verifyOnlyKeys }}
- {file: {{ printf "/var/run/secrets/edge-proxy/signing/%s" . | quote }}, active: false}
{{- end }}
{{- end }}

{{/* Restart pods when a Secret they read at start-up changes (env vars, signing keys). lookup sees nothing
     under `helm template`: GitOps renders hash nothing and stay stable; there, rename the Secret to roll. */}}
{{- define "edge-proxy.secretsChecksum" -}}
{{- $data := dict }}
{{- range $name := compact (list .Values.signingKey.existingSecret .Values.redis.existingSecret .Values.providerSecrets.existingSecret) | uniq }}
{{- $secret := lookup "v1" "Secret" $.Release.Namespace $name | default dict }}
{{- $_ := set $data $name (get $secret "data" | default dict) }}
{{- end }}
{{- toJson $data | sha256sum }}
{{- end }}

{{- define "edge-proxy.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "edge-proxy.fullname" .)) .Values.policiesExistingConfigMap }}
{{- end }}

{{/* config.yaml as the pod sees it: values.config plus the keys the chart owns, so the app cannot disagree
     with the pod: its port, its drain deadline (the grace period is built from it) and the Redis env var. */}}
{{- define "edge-proxy.configYaml" -}}
{{- $config := deepCopy .Values.config }}
{{- if .Values.demo.enabled }}
{{- $providers := get $config "providers" | default dict }}
{{- $_ := set $providers "demo" (dict "kind" "demo") }}
{{- $_ := set $config "providers" $providers }}
{{- $_ := set $config "models" (prepend (get $config "models" | default list) (include "edge-proxy.demoModel" . | fromYaml)) }}
{{- end }}
{{- $auth := get $config "auth" | default dict }}
{{- $_ := set $auth "signing_keys" (include "edge-proxy.signingKeys" . | fromYamlArray) }}
{{- $_ := set $config "auth" $auth }}
{{- if not (get $config "providers") }}
{{- fail "config.providers is empty: give your providers and models under config, or set demo.enabled=true" }}
{{- end }}
{{- $server := get $config "server" | default dict }}
{{- $_ := set $server "port" .Values.containerPort }}
{{- $_ := set $server "shutdown_grace_s" .Values.shutdown.drainSeconds }}
{{- if gt (int .Values.metrics.port) 0 }}
{{- $_ := set $server "metrics_port" .Values.metrics.port }}
{{- end }}
{{- $_ := set $config "server" $server }}
{{- if .Values.redis.existingSecret }}
{{- $store := get $config "store" | default dict }}
{{- $_ := set $store "kind" "redis" }}
{{- $_ := set $store "redis_url_env" "REDIS_URL" }}
{{- $_ := set $config "store" $store }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The port Prometheus scrapes: the separate metrics listener, or the main one. */}}
{{- define "edge-proxy.metricsPortName" -}}
{{- ternary "metrics" "http" (gt (int .Values.metrics.port) 0) }}
{{- end }}

{{/* Grace period: preStop pause + drain deadline + margin, so SIGKILL never cuts a draining stream. */}}
{{- define "edge-proxy.terminationGracePeriod" -}}
{{- add .Values.shutdown.preStopSleepSeconds .Values.shutdown.drainSeconds .Values.shutdown.marginSeconds }}
{{- end }}

{{/* What demo.enabled adds: one model on the built-in demo upstream, and a policy plan for it. */}}
{{- define "edge-proxy.demoModel" -}}
{id: demo/chat, name: Demo Chat, creator: edge-proxy, capability: text2text, provider: demo, upstream_model: demo-chat}
{{- end }}

{{- define "edge-proxy.demoPolicy" -}}
# Added by demo.enabled (set it false to drop it). Keys: `edge-proxy keys new --plan demo`.
plans:
  demo:
    models: ["demo/*"]
    rate_limits:
      - {per: user, requests: 60, window: 1m}
keys: []
{{- end }}

{{/* policies/*.yaml as the pod sees them: values.policies plus the demo's file while demo.enabled. */}}
{{- define "edge-proxy.policyFiles" -}}
{{- $files := dict }}
{{- range $file, $content := .Values.policies }}
{{- $_ := set $files $file (kindIs "string" $content | ternary $content (toYaml $content)) }}
{{- end }}
{{- if .Values.demo.enabled }}
{{- $_ := set $files "edge-proxy-demo.yaml" (include "edge-proxy.demoPolicy" .) }}
{{- end }}
{{- if not $files }}
{{- fail "policies is empty: give policy files under policies, set policiesExistingConfigMap, or set demo.enabled=true" }}
{{- end }}
{{- toYaml $files }}
{{- end }}
