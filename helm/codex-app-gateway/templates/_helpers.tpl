{{/*
Names and labels shared by every template.
*/}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "cxg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: the release name when it already contains the chart
name, "<release>-<chart>" otherwise; 63 characters at most (a DNS label).
*/}}
{{- define "cxg.fullname" -}}
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

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "cxg.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels that select the pods; never change them on an existing release. */}}
{{- define "cxg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cxg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels on every object. */}}
{{- define "cxg.labels" -}}
helm.sh/chart: {{ include "cxg.chart" . }}
{{ include "cxg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: agentserver
{{- end }}

{{/* The ServiceAccount the pod runs as. */}}
{{- define "cxg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cxg.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest when a digest is set, repository:tag otherwise. */}}
{{- define "cxg.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: preStop sleep + drain budget + margin, because the kubelet
counts the grace period from the start of the preStop hook. An explicit override that leaves
less than that fails rendering.
*/}}
{{- define "cxg.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- $needed := add (int $s.preStopSleepSeconds) (int $s.drainBudgetSeconds) (int $s.marginSeconds) }}
{{- $what := printf "the preStop sleep (%d s), the drain budget (%d s) and the margin (%d s)" (int $s.preStopSleepSeconds) (int $s.drainBudgetSeconds) (int $s.marginSeconds) }}
{{- if include "cxg.replicaMode" . }}
{{- /* A turn still running at the drain budget is stopped then, and saved after. */}}
{{- $needed = add $needed (int .Values.sessions.childStopGraceSeconds) (include "cxg.drainFinalSaveSeconds" . | int) }}
{{- $what = printf "the preStop sleep (%d s), the drain budget (%d s), the child stop grace (%d s), the final save (%s s) and the margin (%d s)" (int $s.preStopSleepSeconds) (int $s.drainBudgetSeconds) (int .Values.sessions.childStopGraceSeconds) (include "cxg.drainFinalSaveSeconds" .) (int $s.marginSeconds) }}
{{- end }}
{{- if kindIs "invalid" $s.terminationGracePeriodSeconds }}
{{- $needed }}
{{- else if lt (int $s.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds is %d but %s need %d s: raise it or leave it null to derive it" (int $s.terminationGracePeriodSeconds) $what (int $needed)) }}
{{- else }}
{{- int $s.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
An env entry for one secret: valueFrom.secretKeyRef, never a literal value.
Call with (dict "root" $ "env" "CXG_…" "ref" .Values.secrets.<name> "path" "secrets.<name>").
*/}}
{{- define "cxg.secretEnv" -}}
{{- $name := default .root.Values.secrets.existingSecret .ref.name }}
{{- if not $name }}
{{- fail (printf "%s needs a Secret: set %s.name or secrets.existingSecret" .env .path) }}
{{- end }}
{{- if not .ref.key }}
{{- fail (printf "%s needs %s.key" .env .path) }}
{{- end -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $name | quote }}
      key: {{ .ref.key | quote }}
{{- end }}

{{/*
The secrets the configured features use, as a YAML list of {env, name, key}: each is given to
the daemon as a 0400 file (CXG_<NAME>_FILE, secrets.asFiles) or as a secretKeyRef variable.
*/}}
{{- define "cxg.secretRefs" -}}
{{- $wanted := list }}
{{- if .Values.auth.agentserver.internalUrl }}
{{- $wanted = append $wanted (dict "env" "CXG_AGENTSERVER_INTERNAL_SECRET" "ref" .Values.secrets.agentserverInternal "path" "secrets.agentserverInternal") }}
{{- end }}
{{- if .Values.auth.inboundHmac.enabled }}
{{- $wanted = append $wanted (dict "env" "CXG_INBOUND_HMAC_SECRET" "ref" .Values.secrets.inboundHmac "path" "secrets.inboundHmac") }}
{{- end }}
{{- if .Values.admin.enabled }}
{{- $wanted = append $wanted (dict "env" "CXG_ADMIN_SECRET" "ref" .Values.secrets.admin "path" "secrets.admin") }}
{{- end }}
{{- if and .Values.s3.bucket (eq .Values.s3.credentials "secret") }}
{{- $wanted = append $wanted (dict "env" "CXG_S3_SECRET_ACCESS_KEY" "ref" (dict "name" .Values.s3.existingSecret "key" .Values.s3.secretAccessKeyKey) "path" "s3.existingSecret") }}
{{- end }}
{{- if include "cxg.execGatewayEnabled" . }}
{{- $wanted = append $wanted (dict "env" "CXG_EXEC_GATEWAY_INTERNAL_SECRET" "ref" .Values.secrets.execGatewayInternal "path" "secrets.execGatewayInternal") }}
{{- $wanted = append $wanted (dict "env" "CXG_CAPTOKEN_HMAC_SECRET" "ref" .Values.secrets.capTokenHmac "path" "secrets.capTokenHmac") }}
{{- end }}
{{- if .Values.model.staticApiKey }}
{{- $wanted = append $wanted (dict "env" "CXG_CODEX_API_KEY" "ref" .Values.secrets.codexApiKey "path" "secrets.codexApiKey") }}
{{- end }}
{{- if include "cxg.replicaMode" . }}
{{- $wanted = append $wanted (dict "env" "CXG_PEER_SECRET" "ref" .Values.secrets.peer "path" "secrets.peer") }}
{{- end }}
{{- $refs := list }}
{{- range $wanted }}
{{- $name := default $.Values.secrets.existingSecret .ref.name }}
{{- if not $name }}
{{- fail (printf "%s needs a Secret: set %s.name or secrets.existingSecret" .env .path) }}
{{- end }}
{{- if not .ref.key }}
{{- fail (printf "%s needs %s.key" .env .path) }}
{{- end }}
{{- $refs = append $refs (dict "env" .env "name" $name "key" .ref.key) }}
{{- end }}
{{- toYaml $refs }}
{{- end }}

{{/*
Replica mode: replicas.enabled when it is set, else on exactly when replicaCount > 1.
Renders "true" or nothing.
*/}}
{{- define "cxg.replicaMode" -}}
{{- if kindIs "invalid" .Values.replicas.enabled }}
{{- if gt (int .Values.replicaCount) 1 }}true{{- end }}
{{- else if .Values.replicas.enabled }}true
{{- end }}
{{- end }}

{{/* What a replica-mode drain allows the last final saves (gateway/sessions/manager.py
DRAIN_FINAL_SAVE_SECONDS). */}}
{{- define "cxg.drainFinalSaveSeconds" -}}10{{- end }}

{{/* Where secret files are mounted (secrets.asFiles). */}}
{{- define "cxg.secretDir" -}}/etc/codex-app-gateway/secrets{{- end }}

{{/* Is the exec gateway configured? Any of its settings switches the whole group on. */}}
{{- define "cxg.execGatewayEnabled" -}}
{{- if or .Values.execGateway.url .Values.execGateway.internalUrl }}true{{- end }}
{{- end }}

{{/* Checks that span several values; each failure names the values to fix. */}}
{{- define "cxg.validate" -}}
{{- $mount := trimSuffix "/" .Values.sessionVolume.mountPath }}
{{- if or (eq $mount "/tmp") (hasPrefix "/tmp/" $mount) }}
{{- fail "sessionVolume.mountPath must not be under /tmp: codex refuses to create its helper aliases when CODEX_HOME is there" }}
{{- end }}
{{- if not (hasPrefix (printf "%s/" $mount) .Values.tmpRoot) }}
{{- fail (printf "tmpRoot (%s) must lie under sessionVolume.mountPath (%s), the only writable volume for sessions" .Values.tmpRoot $mount) }}
{{- end }}
{{- if and (not .Values.s3.bucket) (not (hasPrefix (printf "%s/" $mount) .Values.localStore.dir)) }}
{{- fail (printf "localStore.dir (%s) must lie under sessionVolume.mountPath (%s) when no S3 bucket is set" .Values.localStore.dir $mount) }}
{{- end }}
{{- if gt (int .Values.sessions.childStopGraceSeconds) (int .Values.shutdown.drainBudgetSeconds) }}
{{- fail (printf "sessions.childStopGraceSeconds (%d) exceeds shutdown.drainBudgetSeconds (%d): a stopping child could outlive the drain" (int .Values.sessions.childStopGraceSeconds) (int .Values.shutdown.drainBudgetSeconds)) }}
{{- end }}
{{- if and (include "cxg.replicaMode" .) (not .Values.s3.bucket) }}
{{- fail "replica mode (replicaCount > 1, or replicas.enabled) needs s3.bucket: ownership of workspaces is decided in the bucket, and each pod's local store is its own disk" }}
{{- end }}
{{- if and .Values.s3.endpoint (not .Values.s3.bucket) }}
{{- fail "s3.endpoint is set but s3.bucket is not: set the bucket too" }}
{{- end }}
{{- if and .Values.s3.bucket (eq .Values.s3.credentials "secret") (not .Values.s3.existingSecret) }}
{{- fail "s3.bucket is set: s3.existingSecret must name the Secret with the S3 credentials (or set s3.credentials to defaultChain for IRSA or an instance profile)" }}
{{- end }}
{{- if include "cxg.execGatewayEnabled" . }}
{{- if not (and .Values.execGateway.url .Values.execGateway.internalUrl) }}
{{- fail "the exec gateway needs both execGateway.url (ws://…) and execGateway.internalUrl (http://…)" }}
{{- end }}
{{- end }}
{{- if and .Values.metrics.port (eq (int .Values.metrics.port) (int .Values.port)) }}
{{- fail "metrics.port must differ from port (leave it null to serve /metrics on the main port)" }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.externalHost) }}
{{- fail "ingress.enabled needs externalHost" }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.externalHost) }}
{{- fail "httpRoute.enabled needs externalHost" }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) }}
{{- fail "httpRoute.enabled needs httpRoute.parentRefs (the Gateway to attach to)" }}
{{- end }}
{{- end }}

{{/*
The TCP port a URL reaches: its explicit port, else the scheme's default (443 for https/wss,
80 for http/ws). Used to derive NetworkPolicy egress ports from the configured endpoints.
*/}}
{{- define "cxg.urlPort" -}}
{{- $url := urlParse . }}
{{- $host := $url.host }}
{{- if regexMatch ":[0-9]+$" $host }}
{{- regexFind "[0-9]+$" $host }}
{{- else if has $url.scheme (list "https" "wss") }}443
{{- else }}80
{{- end }}
{{- end }}

{{/*
Egress ports of one NetworkPolicy rule: the rule's own `ports` when given, else one TCP port
per configured URL (duplicates dropped). Renders a YAML list, or nothing when there is no URL.
*/}}
{{- define "cxg.egressPorts" -}}
{{- if .rule.ports }}
{{- toYaml .rule.ports }}
{{- else }}
{{- $ports := list }}
{{- range .urls }}
{{- if . }}
{{- $ports = append $ports (include "cxg.urlPort" . | int) }}
{{- end }}
{{- end }}
{{- range $port := $ports | uniq }}
- port: {{ $port }}
  protocol: TCP
{{- end }}
{{- end }}
{{- end }}
