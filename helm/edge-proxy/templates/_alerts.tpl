{{/* Prometheus alerting rules, thresholds and `for:` durations from metrics.alerts. The annotations in
     backquotes are Prometheus' own templates, passed through as text. alerts/rules.yaml is this, rendered with
     the defaults (tests/test_helm_alerts.py fails when it drifts), for Prometheus setups without the operator. */}}
{{- define "edge-proxy.alertRules" -}}
{{- $a := .Values.metrics.alerts }}
{{- $job := $a.job | default (include "edge-proxy.fullname" .) }}
groups:
  - name: edge-proxy
    rules:
      - alert: EdgeProxyTargetDown
        expr: up{job="{{ $job }}"} == 0
        for: {{ $a.targetDown.for }}
        labels:
          severity: {{ $a.targetDown.severity }}
        annotations:
          summary: "edge-proxy: a scrape target is down"
          description: {{ `"{{ $labels.instance }} in {{ $labels.namespace }} has not answered /metrics: the pod is gone, stuck or unreachable."` }}

      - alert: EdgeProxyHighErrorRate
        expr: |
          sum by (namespace, job) (rate(edge_proxy_requests_total{status_class="5xx"}[5m]))
            / sum by (namespace, job) (rate(edge_proxy_requests_total[5m])) > {{ $a.errorRate.threshold }}
          and sum by (namespace, job) (rate(edge_proxy_requests_total[5m])) > 0.1
        for: {{ $a.errorRate.for }}
        labels:
          severity: {{ $a.errorRate.severity }}
        annotations:
          summary: "edge-proxy: too many requests fail with 5xx"
          description: {{ `"{{ $value | humanizePercentage }} of requests in {{ $labels.namespace }} answered 5xx over 5m. Check the errors-by-code panel: upstream_error / upstream_timeout point at a provider, store_unavailable at Redis."` }}

      - alert: EdgeProxyHighLatencyP95
        expr: |
          histogram_quantile(0.95,
            sum by (namespace, job, le) (rate(edge_proxy_time_to_first_byte_seconds_bucket[5m]))) > {{ $a.latencyP95.threshold }}
        for: {{ $a.latencyP95.for }}
        labels:
          severity: {{ $a.latencyP95.severity }}
        annotations:
          summary: "edge-proxy: p95 time to first byte is high"
          description: {{ `"p95 time to first byte in {{ $labels.namespace }} is {{ $value | humanizeDuration }}. Streams are long by nature, so this watches the first byte; compare with upstream latency by provider."` }}

      - alert: EdgeProxyUpstreamErrors
        expr: |
          sum by (namespace, job, provider) (rate(edge_proxy_upstream_errors_total[5m]))
            / sum by (namespace, job, provider) (rate(edge_proxy_upstream_request_duration_seconds_count[5m])) > {{ $a.upstreamErrors.threshold }}
        for: {{ $a.upstreamErrors.for }}
        labels:
          severity: {{ $a.upstreamErrors.severity }}
        annotations:
          summary: {{ `"edge-proxy: provider {{ $labels.provider }} fails too many calls"` }}
          description: {{ `"{{ $value | humanizePercentage }} of calls to {{ $labels.provider }} failed over 5m."` }}

      - alert: EdgeProxyDeploymentEjected
        expr: max by (namespace, job, model, deployment) (edge_proxy_deployment_breaker_state) == 2
        for: {{ $a.deploymentEjected.for }}
        labels:
          severity: {{ $a.deploymentEjected.severity }}
        annotations:
          summary: {{ `"edge-proxy: deployment {{ $labels.deployment }} of {{ $labels.model }} ejected"` }}
          description: "Its circuit breaker has been open on at least one pod (failures in a row, an error rate or a latency above its bound; see routing.breaker). Calls go to the model's other deployments and fallbacks; check the provider."

      - alert: EdgeProxyHighFallbackRate
        expr: |
          sum by (namespace, job, model) (rate(edge_proxy_route_retries_total{kind="fallback"}[10m]))
            / sum by (namespace, job, model) (rate(edge_proxy_requests_total[10m])) > {{ $a.highFallbackRate.threshold }}
          and sum by (namespace, job, model) (rate(edge_proxy_requests_total[10m])) > 0.05
        for: {{ $a.highFallbackRate.for }}
        labels:
          severity: {{ $a.highFallbackRate.severity }}
        annotations:
          summary: {{ `"edge-proxy: many {{ $labels.model }} calls go to a fallback model"` }}
          description: {{ `"{{ $value | humanizePercentage }} of requests for {{ $labels.model }} were served (or tried) by a fallback model over 10m: its own deployments are failing or throttled."` }}

      - alert: EdgeProxyStoreDown
        expr: min by (namespace, job) (edge_proxy_store_up) == 0
        for: {{ $a.storeDown.for }}
        labels:
          severity: {{ $a.storeDown.severity }}
        annotations:
          summary: "edge-proxy: metering store (Redis) unreachable"
          description: {{ `"At least one pod in {{ $labels.namespace }} cannot reach its store. Pods stay ready; with fail-closed credits, metered requests get 503 store_unavailable."` }}

      - alert: EdgeProxyPendingSettles
        expr: max by (namespace, job) (edge_proxy_pending_settles) > {{ $a.pendingSettles.threshold }}
        for: {{ $a.pendingSettles.for }}
        labels:
          severity: {{ $a.pendingSettles.severity }}
        annotations:
          summary: "edge-proxy: settles are waiting for the store"
          description: {{ `"{{ $value }} finished requests in {{ $labels.namespace }} are not charged yet: their settles wait for the store. They are retried; a pod that stops now loses them."` }}

      - alert: EdgeProxyStoreErrors
        expr: sum by (namespace, job, op) (rate(edge_proxy_store_errors_total[5m])) > {{ $a.storeErrors.threshold }}
        for: {{ $a.storeErrors.for }}
        labels:
          severity: {{ $a.storeErrors.severity }}
        annotations:
          summary: {{ `"edge-proxy: store operation {{ $labels.op }} failing"` }}
          description: {{ `"{{ $value }} failed {{ $labels.op }} operations per second."` }}

      - alert: EdgeProxyJwksFetchFailing
        expr: sum by (namespace, job, issuer) (increase(edge_proxy_jwks_fetches_total{outcome="failure"}[15m])) > {{ $a.jwksFetchFailing.threshold }}
        for: {{ $a.jwksFetchFailing.for }}
        labels:
          severity: {{ $a.jwksFetchFailing.severity }}
        annotations:
          summary: {{ `"edge-proxy: cannot fetch JWKS for issuer {{ $labels.issuer }}"` }}
          description: {{ `"JWKS fetches for {{ $labels.issuer }} keep failing; tokens signed with new keys will be rejected until a fetch succeeds."` }}

      - alert: EdgeProxyCreditsExhaustion
        expr: |
          sum by (namespace, job) (rate(edge_proxy_errors_total{code="insufficient_credits"}[15m]))
            / sum by (namespace, job) (rate(edge_proxy_requests_total[15m])) > {{ $a.creditsExhaustion.threshold }}
        for: {{ $a.creditsExhaustion.for }}
        labels:
          severity: {{ $a.creditsExhaustion.severity }}
        annotations:
          summary: "edge-proxy: many requests refused with 402 insufficient_credits"
          description: {{ `"{{ $value | humanizePercentage }} of requests in {{ $labels.namespace }} were refused for credits over 15m: budgets may be too small or a period did not roll over."` }}

      - alert: EdgeProxyPolicyReloadFailed
        expr: max by (namespace, job) (edge_proxy_policy_reload_failing) == 1
        for: {{ $a.policyReloadFailed.for }}
        labels:
          severity: {{ $a.policyReloadFailed.severity }}
        annotations:
          summary: "edge-proxy: policy files rejected"
          description: "A policies/*.yaml change was rejected and is still in place; the previous policy stays in force until the files are fixed. See the pod logs for the file and key."

      - alert: EdgeProxyAuthFailureSpike
        expr: sum by (namespace, job) (rate(edge_proxy_auth_failures_total[5m])) > {{ $a.authFailureSpike.threshold }}
        for: {{ $a.authFailureSpike.for }}
        labels:
          severity: {{ $a.authFailureSpike.severity }}
        annotations:
          summary: "edge-proxy: many failed authentications"
          description: "Failed authentications by reason are on the dashboard; a spike of invalid_api_key may be credential stuffing."
{{- end }}
