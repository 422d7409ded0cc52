//! The custom resources of the Kubernetes store, in the API group [`GROUP`].
//!
//! One object per record, all in the server's namespace (so the server's RBAC is one Role):
//!
//! | Kind | `metadata.name` | why that name |
//! |---|---|---|
//! | `Cluster` | the cluster id, `c-xxxxx` | ids are what agents, grants and nodes refer to; the apiserver makes them unique |
//! | `Node` | `<cluster-id>.<machine>` | one node per machine name and cluster, found without a scan |
//! | `ClusterRegistrationToken` | `rt-<sha256 of the token, 40 hex>` | an agent's token is found by hashing it; the token itself is never a name |
//! | `User` | the user id, `u-xxxxxxxx` | the bearer path goes token → user id in one lookup |
//! | `Token` | the token id, `token-xxxxx` | the part before `:` of a bearer value |
//! | `Grant` | `<user-id>.<cluster-id>` | granting twice is creating the same name: idempotent |
//!
//! Display names (of clusters and users) are unique too, but the apiserver enforces uniqueness
//! of `metadata.name` only: the store claims a display name by creating, then listing by the
//! name's hash label, and withdrawing if anyone else holds it (see `claim_unique_name`).
//!
//! Secrets never sit in these objects in the clear: API tokens as SHA-256 hashes (as in SQLite),
//! registration tokens and the agent's service-account token sealed with a key kept in the one
//! Secret (ChaCha20-Poly1305), so reading the custom resources alone grants nothing.
//!
//! Status subresources carry live state: the `Connected` condition, the replica that holds the
//! tunnel, and when it was last seen; the agent's report of its apiserver goes to the cluster's
//! status too (what the agent observed, as Rancher's `status.apiEndpoint`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every resource of the store.
pub const GROUP: &str = "tunnel-server.dev";
/// Its version.
pub const VERSION: &str = "v1alpha1";
/// Label: the cluster an object belongs to (tokens, nodes, grants).
pub const LABEL_CLUSTER: &str = "tunnel-server.dev/cluster";
/// Label: the user an object belongs to (tokens, grants).
pub const LABEL_USER: &str = "tunnel-server.dev/user";
/// Label: SHA-256 of a display name (first 40 hex), to find holders of a name.
pub const LABEL_NAME_HASH: &str = "tunnel-server.dev/name-hash";

/// A condition, as in Kubernetes' own status conventions.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Connected`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// RFC 3339 time the status last changed.
    pub last_transition_time: String,
    /// One CamelCase word.
    #[serde(default)]
    pub reason: String,
    /// For humans.
    #[serde(default)]
    pub message: String,
}

/// Live state of a tunnel's end: shared by clusters and nodes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Presence {
    /// `Connected`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The server replica that holds (or last held) the tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Where the other replicas reach that replica's peer listener (`host:port`) to forward
    /// requests for this tunnel to it; empty when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Unix seconds the tunnel was last seen up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
}

/// An imported cluster.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tunnel-server.dev",
    version = "v1alpha1",
    kind = "Cluster",
    namespaced,
    status = "ClusterStatus",
    printcolumn = r#"{"name":"Display Name","type":"string","jsonPath":".spec.displayName"}"#,
    printcolumn = r#"{"name":"Connected","type":"string","jsonPath":".status.conditions[?(@.type==\"Connected\")].status"}"#,
    printcolumn = r#"{"name":"Replica","type":"string","jsonPath":".status.replica"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.agent.apiEndpoint"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// Unique display name.
    pub display_name: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// What the cluster agent reported, and whether its tunnel is up.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// The agent's report of its apiserver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentReport>,
    /// Live state.
    #[serde(flatten)]
    pub presence: Presence,
}

/// The cluster agent's report of its apiserver.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// `https://<address>`.
    pub api_endpoint: String,
    /// Base64 of the CA PEM.
    pub ca_cert: String,
    /// The service-account token, sealed.
    pub sealed_service_account_token: String,
}

/// A node (a node agent's host) of a cluster.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tunnel-server.dev",
    version = "v1alpha1",
    kind = "Node",
    namespaced,
    status = "NodeStatus",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.clusterId"}"#,
    printcolumn = r#"{"name":"Hostname","type":"string","jsonPath":".spec.hostname"}"#,
    printcolumn = r#"{"name":"Connected","type":"string","jsonPath":".status.conditions[?(@.type==\"Connected\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// Its cluster.
    pub cluster_id: String,
    /// Machine name, `m-<12 hex>`.
    pub machine_id: String,
    /// The host name the agent sent.
    pub hostname: String,
    /// Docker socket path dialed through the node's tunnel.
    pub docker_socket: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The node params as last sent.
    #[schemars(schema_with = "any_json")]
    pub params: serde_json::Value,
}

/// Whether a node's tunnel is up.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Live state.
    #[serde(flatten)]
    pub presence: Presence,
}

/// A registration token of a cluster.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tunnel-server.dev",
    version = "v1alpha1",
    kind = "ClusterRegistrationToken",
    namespaced,
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.clusterId"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRegistrationTokenSpec {
    /// Its cluster.
    pub cluster_id: String,
    /// SHA-256 of the token, hex (the object's name holds its first 40 characters).
    pub token_hash: String,
    /// The token, sealed (shown again by `cluster token` in import commands).
    pub sealed_token: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A user of the proxied APIs.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tunnel-server.dev",
    version = "v1alpha1",
    kind = "User",
    namespaced,
    printcolumn = r#"{"name":"Display Name","type":"string","jsonPath":".spec.displayName"}"#,
    printcolumn = r#"{"name":"Admin","type":"boolean","jsonPath":".spec.admin"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct UserSpec {
    /// Unique name; the `Impersonate-User` downstream.
    pub display_name: String,
    /// `Impersonate-Group` values.
    #[serde(default)]
    pub groups: Vec<String>,
    /// May use the `/v1` API and reach every cluster.
    #[serde(default)]
    pub admin: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// An API token of a user: its secret's hash only.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tunnel-server.dev",
    version = "v1alpha1",
    kind = "Token",
    namespaced,
    status = "TokenStatus",
    printcolumn = r#"{"name":"User","type":"string","jsonPath":".spec.userId"}"#,
    printcolumn = r#"{"name":"Revoked","type":"boolean","jsonPath":".spec.revoked"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TokenSpec {
    /// Its user.
    pub user_id: String,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds after which it authenticates nobody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Revoked tokens authenticate nobody.
    #[serde(default)]
    pub revoked: bool,
}

/// When a token was last used.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// Unix seconds of the last successful authentication, as last flushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<i64>,
}

/// A user's access to a cluster.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tunnel-server.dev",
    version = "v1alpha1",
    kind = "Grant",
    namespaced,
    printcolumn = r#"{"name":"User","type":"string","jsonPath":".spec.userId"}"#,
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.clusterId"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GrantSpec {
    /// The user.
    pub user_id: String,
    /// The cluster.
    pub cluster_id: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// Any JSON value (`x-kubernetes-preserve-unknown-fields`).
fn any_json(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// The CustomResourceDefinitions of the store, as one multi-document YAML (what
/// `tunnel-server crds` prints and `deploy/server/kubernetes-store/crds.yaml` holds).
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt;
    let crds = [
        Cluster::crd(),
        Node::crd(),
        ClusterRegistrationToken::crd(),
        User::crd(),
        Token::crd(),
        Grant::crd(),
    ];
    let mut out = String::from(
        "# Generated by `tunnel-server crds` from server-side/src/store/kube/crd.rs; do not edit.\n",
    );
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("a CRD serializes"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_have_status_subresources_where_live_state_goes() {
        use kube::CustomResourceExt;
        let has_status = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
            crd.spec.versions[0]
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some())
        };
        assert!(has_status(Cluster::crd()));
        assert!(has_status(Node::crd()));
        assert!(has_status(Token::crd()));
        assert!(!has_status(Grant::crd()));
        assert_eq!(Cluster::crd().spec.group, GROUP);
        assert!(
            crds_yaml()
                .matches("kind: CustomResourceDefinition")
                .count()
                == 6
        );
    }

    #[test]
    fn node_params_keep_unknown_fields() {
        let yaml = crds_yaml();
        assert!(yaml.contains("x-kubernetes-preserve-unknown-fields: true"));
    }
}
