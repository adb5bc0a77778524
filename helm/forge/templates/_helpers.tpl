{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "forge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, plus the chart name when the release name does
not contain it. Component names add a suffix, so keep room for it (52 characters).
*/}}
{{- define "forge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value.
*/}}
{{- define "forge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels. Call with (dict "root" $ "component" "gateway").
*/}}
{{- define "forge.labels" -}}
helm.sh/chart: {{ include "forge.chart" .root }}
{{ include "forge.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: crafterse-forge
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels. Call with (dict "root" $ "component" "gateway").
*/}}
{{- define "forge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "forge.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/*
Service account name.
*/}}
{{- define "forge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "forge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference from an images.<name> entry: repository@digest, else repository:tag (the tag
defaulting to the chart's appVersion). Call with (dict "root" $ "image" .Values.images.gateway).
*/}}
{{- define "forge.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
Storage class of a volume: its own, else the chart's gp3 class when the chart creates it,
else nothing (the cluster default).
*/}}
{{- define "forge.storageClassName" -}}
{{- if .own }}
{{- .own }}
{{- else if .root.Values.storageClass.create }}
{{- .root.Values.storageClass.name }}
{{- end }}
{{- end }}

{{/*
Kafka bootstrap servers.
*/}}
{{- define "forge.kafkaBootstrap" -}}
{{- if eq .Values.kafka.mode "strimzi" }}
{{- printf "%s-kafka-bootstrap.%s.svc:9092" (include "forge.fullname" .) .Release.Namespace }}
{{- else }}
{{- required "kafka.external.bootstrapServers is required when kafka.mode is external" .Values.kafka.external.bootstrapServers }}
{{- end }}
{{- end }}

{{/*
Replication factor of the Kafka topics: min(3, brokers) on the chart's Strimzi cluster (the
KafkaTopics and the gateway's own topic creation agree), kafka.external.topicReplication on
an external cluster.
*/}}
{{- define "forge.topicReplication" -}}
{{- if eq .Values.kafka.mode "strimzi" }}
{{- min 3 (int .Values.kafka.strimzi.brokers) }}
{{- else }}
{{- int .Values.kafka.external.topicReplication }}
{{- end }}
{{- end }}

{{/*
min.insync.replicas of the chart's Strimzi cluster: one less than the replication factor, at
least 1. Replication 3 gives 2: an acknowledged write (acks=all) is on two brokers, and one
broker may be down without stopping writes. Replication 2 gives 1 (2 would stop every write
while one broker is down), replication 1 gives 1.
*/}}
{{- define "forge.minInsyncReplicas" -}}
{{- max 1 (sub (int (include "forge.topicReplication" .)) 1) }}
{{- end }}

{{/*
Partitions the gateway gives a topic it creates (FORGE_TOPIC_PARTITIONS): the most of any
topic in kafka.topics. Also checks that kafka.topics names every topic the application uses
(gateway/topics.py: kafka.topicPrefix + priority, standard, bulk, each tier's <tier>.retry,
results, dead-letter) and that the KEDA lag thresholds name only request topics, so the
names cannot drift apart.
*/}}
{{- define "forge.topicPartitions" -}}
{{- $prefix := .Values.kafka.topicPrefix }}
{{- $names := list }}
{{- $most := 1 }}
{{- range .Values.kafka.topics }}
{{- $names = append $names .name }}
{{- $most = max $most (int .partitions) }}
{{- end }}
{{- range list "priority" "priority.retry" "standard" "standard.retry" "bulk" "bulk.retry" "results" "dead-letter" }}
{{- if not (has (printf "%s%s" $prefix .) $names) }}
{{- fail (printf "kafka.topics has no topic %s%s: the gateway and workers use kafka.topicPrefix (%s) + priority, priority.retry, standard, standard.retry, bulk, bulk.retry, results, dead-letter" $prefix . $prefix) }}
{{- end }}
{{- end }}
{{- range $topic, $_ := .Values.workers.autoscaling.lagThreshold }}
{{- if not (has $topic (list (printf "%spriority" $prefix) (printf "%sstandard" $prefix) (printf "%sbulk" $prefix))) }}
{{- fail (printf "workers.autoscaling.lagThreshold names %s, which is not a job topic (kafka.topicPrefix %s + priority, standard or bulk)" $topic $prefix) }}
{{- end }}
{{- end }}
{{- $most }}
{{- end }}

{{/*
True ("true") when this release runs a Redis of its own (the state Redis, the cache or both):
they require the password of forge.redisAuthSecret.
*/}}
{{- define "forge.inClusterRedis" -}}
{{- if or (eq .Values.redis.mode "replicated") (eq .Values.redis.cache.mode "incluster") }}true{{ end }}
{{- end }}

{{/*
Name of the Secret holding the in-cluster Redis password (key redis.auth.secretKey).
*/}}
{{- define "forge.redisAuthSecret" -}}
{{- default (printf "%s-redis-auth" (include "forge.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{/*
An env entry named .name holding the in-cluster Redis password, from its Secret.
Call with (dict "root" $ "name" "REDIS_PASSWORD").
*/}}
{{- define "forge.redisPasswordEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "forge.redisAuthSecret" .root }}
      key: {{ .root.Values.redis.auth.secretKey }}
{{- end }}

{{/*
A list of integers as a JSON list ([80,443]), whether the values came from YAML (floats in
Helm) or --set (integers).
*/}}
{{- define "forge.intList" -}}
{{- $out := list }}
{{- range . }}{{ $out = append $out (int .) }}{{ end }}
{{- toJson $out }}
{{- end }}

{{/*
The gateway's public paths, the only ones its Ingress routes: the forge page (exactly /), its
static files, the API, the assets, the API reference and its OpenAPI document. Never
/metrics, /healthz or /readyz.
*/}}
{{- define "forge.publicPaths" -}}
- {path: /, pathType: Exact}
- {path: /static/, pathType: Prefix}
- {path: /v1/, pathType: Prefix}
- {path: /assets/, pathType: Prefix}
- {path: /docs, pathType: Exact}
- {path: /openapi.json, pathType: Exact}
{{- end }}

{{/*
Triton gRPC address.
*/}}
{{- define "forge.tritonGrpcUrl" -}}
{{- printf "%s-triton.%s.svc:%v" (include "forge.fullname" .) .Release.Namespace .Values.triton.service.grpcPort }}
{{- end }}

{{/*
Name of the Secret holding the API keys file.
*/}}
{{- define "forge.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "forge.fullname" .)) .Values.forge.apiKeys.existingSecret }}
{{- end }}

{{/*
True ("true") when an API keys file is mounted.
*/}}
{{- define "forge.hasApiKeys" -}}
{{- if or .Values.forge.apiKeys.existingSecret .Values.forge.apiKeys.keysYaml }}true{{ end }}
{{- end }}

{{/*
Name of the ConfigMap holding the weapon templates ("" when none).
*/}}
{{- define "forge.weaponTemplatesConfigMap" -}}
{{- if .Values.forge.weaponTemplates.existingConfigMap }}
{{- .Values.forge.weaponTemplates.existingConfigMap }}
{{- else if .Values.forge.weaponTemplates.content }}
{{- printf "%s-weapon-templates" (include "forge.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Name of the ConfigMap holding the content policy ("" when none).
*/}}
{{- define "forge.contentPolicyConfigMap" -}}
{{- if .Values.forge.contentPolicy.existingConfigMap }}
{{- .Values.forge.contentPolicy.existingConfigMap }}
{{- else if .Values.forge.contentPolicy.content }}
{{- printf "%s-content-policy" (include "forge.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Name of the assets claim.
*/}}
{{- define "forge.assetsClaim" -}}
{{- default (printf "%s-assets" (include "forge.fullname" .)) .Values.forge.assets.pvc.existingClaim }}
{{- end }}

{{/*
FORGE_CACHE_REDIS_URL: the result cache's own Redis (redis.cache), never the state Redis.
*/}}
{{- define "forge.cacheRedisEnv" -}}
{{- $c := .Values.redis.cache }}
{{- if eq $c.mode "incluster" }}
- name: FORGE_CACHE_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis-cache.%s.svc:6379/0" (include "forge.fullname" .) .Release.Namespace | quote }}
{{- else if $c.external.existingSecret }}
- name: FORGE_CACHE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $c.external.existingSecret }}
      key: {{ $c.external.secretKey }}
{{- else }}
- name: FORGE_CACHE_REDIS_URL
  value: {{ required "redis.cache.external.url or redis.cache.external.existingSecret is required when redis.cache.mode is external" $c.external.url | quote }}
{{- end }}
{{- end }}

{{/*
The FORGE_* environment of the gateway and the workers.
*/}}
{{- define "forge.env" -}}
{{- if include "forge.inClusterRedis" . -}}
# The in-cluster Redis password, which Kubernetes puts into FORGE_REDIS_URL and
# FORGE_CACHE_REDIS_URL below ($(REDIS_PASSWORD)); it must come first.
{{ include "forge.redisPasswordEnv" (dict "root" . "name" "REDIS_PASSWORD") }}
{{ end -}}
- name: FORGE_HOST
  value: "0.0.0.0"
- name: FORGE_PORT
  value: "8080"
- name: FORGE_TRITON_GRPC_URL
  value: {{ include "forge.tritonGrpcUrl" . | quote }}
{{- if eq .Values.redis.mode "replicated" }}
- name: FORGE_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis-master.%s.svc:6379/0" (include "forge.fullname" .) .Release.Namespace | quote }}
{{- else if .Values.redis.external.existingSecret }}
- name: FORGE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.secretKey }}
{{- else }}
- name: FORGE_REDIS_URL
  value: {{ required "redis.external.url or redis.external.existingSecret is required when redis.mode is external" .Values.redis.external.url | quote }}
{{- end }}
{{- include "forge.cacheRedisEnv" . }}
- name: FORGE_KAFKA_BOOTSTRAP
  value: {{ include "forge.kafkaBootstrap" . | quote }}
# Kafka settings from the chart's own values (topics, KEDA triggers, PodMonitor), so the
# application and the chart cannot disagree.
- name: FORGE_TOPIC_PREFIX
  value: {{ .Values.kafka.topicPrefix | quote }}
- name: FORGE_TOPIC_PARTITIONS
  value: {{ include "forge.topicPartitions" . | quote }}
- name: FORGE_TOPIC_REPLICATION
  value: {{ include "forge.topicReplication" . | quote }}
- name: FORGE_KAFKA_IDEMPOTENCE
  value: {{ .Values.kafka.idempotence | quote }}
- name: FORGE_CONSUMER_GROUP
  value: {{ .Values.workers.consumerGroup | quote }}
- name: FORGE_WORKER_METRICS_PORT
  value: {{ .Values.workers.metricsPort | quote }}
- name: FORGE_WORKER_CONCURRENCY
  value: {{ .Values.workers.concurrency | quote }}
- name: FORGE_MAX_POLL_INTERVAL_MS
  value: {{ int .Values.workers.maxPollIntervalMs | quote }}
- name: FORGE_SESSION_TIMEOUT_MS
  value: {{ int .Values.workers.sessionTimeoutMs | quote }}
# Callbacks (each API key signs its own with its webhook secret): on or off, the ports and
# the internal networks a callback URL may use; the workers' NetworkPolicy follows them.
- name: FORGE_CALLBACKS
  value: {{ .Values.forge.callbacks.enabled | quote }}
- name: FORGE_CALLBACK_PORTS
  value: {{ include "forge.intList" .Values.forge.callbacks.ports | quote }}
- name: FORGE_CALLBACK_ALLOW_NETWORKS
  value: {{ toJson .Values.forge.callbacks.allowNetworks | quote }}
{{- if eq .Values.forge.assets.mode "s3" }}
- name: FORGE_ASSET_S3_BUCKET
  value: {{ required "forge.assets.s3.bucket is required when forge.assets.mode is s3" .Values.forge.assets.s3.bucket | quote }}
- name: FORGE_ASSET_S3_PREFIX
  value: {{ .Values.forge.assets.s3.prefix | quote }}
{{- else }}
- name: FORGE_ASSET_DIR
  value: {{ .Values.forge.assets.pvc.mountPath | quote }}
{{- end }}
- name: FORGE_PUBLIC_BASE_URL
  value: {{ .Values.forge.assets.publicBaseUrl | quote }}
{{- if include "forge.hasApiKeys" . }}
- name: FORGE_API_KEYS_FILE
  value: /etc/forge/api-keys/{{ .Values.forge.apiKeys.secretKey }}
{{- end }}
{{- if include "forge.weaponTemplatesConfigMap" . }}
- name: FORGE_WEAPON_TEMPLATES
  value: /etc/forge/weapon-templates/weapon-templates.yaml
{{- end }}
{{- if include "forge.contentPolicyConfigMap" . }}
- name: FORGE_CONTENT_POLICY
  value: /etc/forge/content-policy/content-policy.yaml
{{- end }}
{{- $managed := list "FORGE_HOST" "FORGE_PORT" "FORGE_TRITON_GRPC_URL" "FORGE_REDIS_URL" "FORGE_CACHE_REDIS_URL" "FORGE_KAFKA_BOOTSTRAP" "FORGE_TOPIC_PREFIX" "FORGE_TOPIC_PARTITIONS" "FORGE_TOPIC_REPLICATION" "FORGE_KAFKA_IDEMPOTENCE" "FORGE_CONSUMER_GROUP" "FORGE_WORKER_METRICS_PORT" "FORGE_WORKER_CONCURRENCY" "FORGE_MAX_POLL_INTERVAL_MS" "FORGE_SESSION_TIMEOUT_MS" "FORGE_CALLBACKS" "FORGE_CALLBACK_PORTS" "FORGE_CALLBACK_ALLOW_NETWORKS" "FORGE_FORWARDED_ALLOW_IPS" "FORGE_ASSET_S3_BUCKET" "FORGE_ASSET_S3_PREFIX" "FORGE_ASSET_DIR" "FORGE_PUBLIC_BASE_URL" "FORGE_API_KEYS_FILE" "FORGE_WEAPON_TEMPLATES" "FORGE_CONTENT_POLICY" }}
{{- range $name, $value := .Values.forge.extraEnv }}
{{- if eq $name "FORGE_WEBHOOK_SECRET" }}
{{- fail "forge.extraEnv.FORGE_WEBHOOK_SECRET: there is no deployment-wide webhook secret; each API key signs its callbacks with its own (POST /v1/admin/keys returns it, a keys-file entry may carry it as webhook_secret; docs/deploy.md)" }}
{{- end }}
{{- if has $name $managed }}
{{- fail (printf "forge.extraEnv.%s: the chart sets %s from its own values (see values.yaml); set that value instead" $name $name) }}
{{- end }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/*
Why the gateway and the workers read a Secret through env (checkov CKV_K8S_35), or "" when
they read none that way.
*/}}
{{- define "forge.appSecretEnv" -}}
{{- $stateSecret := and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}
{{- $cacheSecret := and (eq .Values.redis.cache.mode "external") .Values.redis.cache.external.existingSecret }}
{{- if or (include "forge.inClusterRedis" .) $stateSecret $cacheSecret -}}
The Redis password (REDIS_PASSWORD, which Kubernetes puts into FORGE_REDIS_URL and FORGE_CACHE_REDIS_URL) or an external Redis URL with its AUTH token comes from a Secret as an env var because the gateway and workers read their settings only from FORGE_* variables; the API keys are mounted as a file
{{- end }}
{{- end }}

{{/*
The private ranges the internet egress rule leaves out: RFC 1918, link-local (the instance
metadata service), carrier-grade NAT (EKS custom networking), loopback; for IPv6 unique local
and link-local. What a pod reaches there is named by its own rule.
*/}}
{{- define "forge.privateRanges" -}}
[10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16, 100.64.0.0/10, 127.0.0.0/8]
{{- end }}

{{/*
Egress rules of the gateway and the workers: DNS, the Kafka brokers, the two Redis, Triton's
gRPC port, networkPolicy.externalServices; the public internet only on the ports that need it
(the workers' callback ports, 443 for S3 and STS with assets on S3), and the callbacks'
allowNetworks on the callback ports. Call with (dict "root" $ "callbacks" true) for the
workers, false for the gateway.
*/}}
{{- define "forge.appEgress" -}}
{{- $v := .root.Values }}
{{- $np := $v.networkPolicy }}
{{- $external := or (eq $v.kafka.mode "external") (eq $v.redis.mode "external") (eq $v.redis.cache.mode "external") }}
{{- if and $external (not $np.externalServices) }}
{{- fail "networkPolicy.externalServices must name the CIDRs and ports of the external Kafka or Redis (kafka.mode or a redis mode is external): the gateway's and workers' egress is closed to private addresses otherwise" }}
{{- end -}}
# DNS: the cluster's resolver.
- to:
    - namespaceSelector:
        {{- toYaml $np.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml $np.dns.podSelector | nindent 8 }}
  ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- if eq $v.kafka.mode "strimzi" }}
# The Kafka brokers: the bootstrap Service and each broker, on the plain listener.
- to:
    - podSelector:
        matchLabels:
          strimzi.io/cluster: {{ include "forge.fullname" .root }}
          strimzi.io/broker-role: "true"
  ports:
    - {port: 9092, protocol: TCP}
{{- end }}
{{- if eq $v.redis.mode "replicated" }}
# The state Redis.
- to:
    - podSelector:
        matchLabels:
          {{- include "forge.selectorLabels" (dict "root" .root "component" "redis") | nindent 10 }}
  ports:
    - {port: 6379, protocol: TCP}
{{- end }}
{{- if eq $v.redis.cache.mode "incluster" }}
# The cache Redis.
- to:
    - podSelector:
        matchLabels:
          {{- include "forge.selectorLabels" (dict "root" .root "component" "redis-cache") | nindent 10 }}
  ports:
    - {port: 6379, protocol: TCP}
{{- end }}
# Triton, gRPC only.
- to:
    - podSelector:
        matchLabels:
          {{- include "forge.selectorLabels" (dict "root" .root "component" "triton") | nindent 10 }}
  ports:
    - {port: {{ int $v.triton.service.grpcPort }}, protocol: TCP}
{{- range $np.externalServices }}
# An external service (networkPolicy.externalServices).
- to:
    - ipBlock: {cidr: {{ .cidr }}}
  ports:
    {{- range .ports }}
    - {port: {{ int . }}, protocol: TCP}
    {{- end }}
{{- end }}
{{- $ports := list }}
{{- if and .callbacks $v.forge.callbacks.enabled }}
{{- range $v.forge.callbacks.ports }}{{ $ports = append $ports (int .) }}{{ end }}
{{- with $v.forge.callbacks.allowNetworks }}
# Internal callback receivers admitted on purpose (forge.callbacks.allowNetworks).
- to:
    {{- range . }}
    - ipBlock: {cidr: {{ . }}}
    {{- end }}
  ports:
    {{- range $ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
{{- end }}
{{- end }}
{{- if eq $v.forge.assets.mode "s3" }}{{ $ports = append $ports 443 }}{{ end }}
{{- $ports = uniq $ports }}
{{- if $ports }}
# The public internet, private ranges left out, on these ports only: {{ if .callbacks }}callbacks
# (forge.callbacks.ports){{ if eq $v.forge.assets.mode "s3" }} and {{ end }}{{ end }}{{ if eq $v.forge.assets.mode "s3" }}S3 and STS (IRSA) on 443{{ end }}.
- to:
    - ipBlock:
        cidr: 0.0.0.0/0
        except: {{ include "forge.privateRanges" .root }}
    {{- if $np.ipv6 }}
    - ipBlock:
        cidr: ::/0
        except: [fc00::/7, fe80::/10]
    {{- end }}
  ports:
    {{- range $ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
{{- end }}
{{- end }}

{{/*
Volumes shared by the gateway and the workers.
*/}}
{{- define "forge.appVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if eq .Values.forge.assets.mode "pvc" }}
- name: assets
  persistentVolumeClaim:
    claimName: {{ include "forge.assetsClaim" . }}
{{- end }}
{{- if include "forge.hasApiKeys" . }}
- name: api-keys
  secret:
    secretName: {{ include "forge.apiKeysSecret" . }}
    defaultMode: 0440
{{- end }}
{{- with include "forge.weaponTemplatesConfigMap" . }}
- name: weapon-templates
  configMap:
    name: {{ . }}
{{- end }}
{{- with include "forge.contentPolicyConfigMap" . }}
- name: content-policy
  configMap:
    name: {{ . }}
{{- end }}
{{- end }}

{{/*
Volume mounts shared by the gateway and the workers.
*/}}
{{- define "forge.appVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if eq .Values.forge.assets.mode "pvc" }}
- name: assets
  mountPath: {{ .Values.forge.assets.pvc.mountPath }}
{{- end }}
{{- if include "forge.hasApiKeys" . }}
- name: api-keys
  mountPath: /etc/forge/api-keys
  readOnly: true
{{- end }}
{{- if include "forge.weaponTemplatesConfigMap" . }}
- name: weapon-templates
  mountPath: /etc/forge/weapon-templates
  readOnly: true
{{- end }}
{{- /* The whole directory, never a subPath: kubelet updates a ConfigMap directory mount in
place (a subPath mount keeps the file the pod started with), so a policy edit reaches the
running processes, which read the file again when it changes. */}}
{{- if include "forge.contentPolicyConfigMap" . }}
- name: content-policy
  mountPath: /etc/forge/content-policy
  readOnly: true
{{- end }}
{{- end }}

{{/*
Pod spec fields shared by every Forge pod.
*/}}
{{- define "forge.podCommon" -}}
serviceAccountName: {{ include "forge.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
Preferred spread of a component's pods over nodes. Call with (dict "root" $ "component" "x").
*/}}
{{- define "forge.spreadAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "forge.selectorLabels" . | nindent 12 }}
{{- end }}

{{/*
checkov skips for a workload, each with its reason, rendered only while the condition that
fails the check holds (a digest set, pullPolicy Always or no secret in env make the skip go
away). "secretEnv" is the reason a container reads a Secret through env (empty: none does).
Call with (dict "root" $ "images" (list .Values.images.gateway) "secretEnv" "...").
*/}}
{{- define "forge.checkovSkips" -}}
{{- $skips := list }}
{{- $noDigest := false }}
{{- $notAlways := false }}
{{- range .images }}
{{- if not .digest }}{{ $noDigest = true }}{{ end }}
{{- if ne .pullPolicy "Always" }}{{ $notAlways = true }}{{ end }}
{{- end }}
{{- if $noDigest }}
{{- $skips = append $skips "CKV_K8S_43=Images are pinned by version tag (ECR tag immutability on); set images.*.digest to pin by digest, which removes this skip" }}
{{- end }}
{{- if $notAlways }}
{{- $skips = append $skips "CKV_K8S_15=Tags are immutable, so IfNotPresent pulls the same image; it spares a registry round trip for the multi-GB Triton image and lets pods restart during a registry outage" }}
{{- end }}
{{- if .secretEnv }}
{{- $skips = append $skips (printf "CKV_K8S_35=%s" .secretEnv) }}
{{- end }}
{{- range $i, $skip := $skips }}
checkov.io/skip{{ add1 $i }}: {{ $skip | quote }}
{{- end }}
{{- end }}
