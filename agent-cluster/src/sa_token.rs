//! The service-account token reported to the server: as Rancher's cluster agent does
//! (`cmd/agent` → `serviceaccounttoken.EnsureSecretForServiceAccount`), the token of a
//! `kubernetes.io/service-account-token` Secret of SA `cattle`, which does not expire, rather
//! than the pod's projected token, which the kubelet rotates and the apiserver expires (so a
//! server holding it would lose the cluster within hours).
//!
//! ```text
//!  ensure_secret: GET sa/cattle ─▶ LIST secrets -l cattle.io/service-account.name=cattle
//!                  ├─ first of type service-account-token annotated for `cattle` ─▶ use it
//!                  │  (others carrying the label are deleted, as Rancher does)
//!                  └─ none ─▶ CREATE generateName cattle-token-, ownerRef sa, label, annotation
//!                             ─▶ annotate the SA rancher.io/service-account.secret-ref=ns/name
//!                                (conflict: delete ours, reload the SA, use the one it names)
//!  wait_for_token: GET until kube-controller-manager's token controller fills data.token
//!                  (bounded: --sa-token-wait) ─▶ Reported::Secret
//!                  not filled / API error ─▶ one WARN ─▶ Reported::Projected (the token file)
//!  watch:          every --sa-token-recheck: ensure again and read the token (or re-read
//!                  the file when falling back); a change is sent on the channel, and the
//!                  agent redials the main tunnel with the new params (see `crate::run`).
//! ```
//!
//! Rancher waits about 5 s (exponential 2 ms → 100 ms, 50 steps) and then fails for good; this
//! agent waits [`DEFAULT_WAIT`] and carries on with the projected token, because clusters
//! without the token controller exist (a lone apiserver in tests; the controller is also off
//! where `--controllers=-serviceaccount-token`), and keeps checking, so the Secret's token is
//! reported as soon as it appears.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::kube::{KubeError, call};

/// The service account whose token is reported (Rancher's, fixed).
pub const SERVICE_ACCOUNT: &str = "cattle";
/// Label Rancher looks Secrets up by.
pub const SECRET_LABEL: &str = "cattle.io/service-account.name";
/// Annotation the token controller reads to know whose token to fill in.
pub const SA_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
/// Annotation Rancher puts on the SA, naming the Secret (`namespace/name`).
pub const SECRET_REF_ANNOTATION: &str = "rancher.io/service-account.secret-ref";
/// `kubernetes.io/service-account-token`.
pub const SECRET_TYPE: &str = "kubernetes.io/service-account-token";
/// The key the token controller fills.
pub const TOKEN_KEY: &str = "token";

/// Default for `--sa-token-wait`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// Default for `--sa-token-recheck`.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(60);

/// The token reported to the server, and where it came from.
#[derive(Clone, PartialEq, Eq)]
pub enum Reported {
    /// `data.token` of the service-account-token Secret `name`.
    Secret {
        /// The Secret's name.
        name: String,
        /// Its token, whitespace-trimmed.
        token: String,
    },
    /// The pod's projected token (the fallback).
    Projected {
        /// The token, whitespace-trimmed.
        token: String,
    },
}

impl std::fmt::Debug for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reported::Secret { name, .. } => f.debug_struct("Secret").field("name", name).finish(),
            Reported::Projected { .. } => f.write_str("Projected"),
        }
    }
}

impl Reported {
    /// The token.
    pub fn token(&self) -> &str {
        match self {
            Reported::Secret { token, .. } | Reported::Projected { token } => token,
        }
    }

    /// `secret <name>` or `projected token`, for logs.
    pub fn source(&self) -> String {
        match self {
            Reported::Secret { name, .. } => format!("secret {name}"),
            Reported::Projected { .. } => "projected token".to_owned(),
        }
    }
}

/// Where to look and how long to wait.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// Namespace of the SA and its Secret (`CATTLE_NAMESPACE`, default `cattle-system`).
    pub namespace: String,
    /// The SA (default [`SERVICE_ACCOUNT`]).
    pub service_account: String,
    /// Bound on the first wait for the token controller (default [`DEFAULT_WAIT`]).
    pub wait: Duration,
    /// Interval of the re-checks (default [`DEFAULT_RECHECK`]).
    pub recheck: Duration,
    /// The projected token file, re-read while falling back (`None`: keep the start-up token).
    pub projected_file: Option<PathBuf>,
}

// === the Secret ===

/// The Secret Rancher's `SecretTemplate` creates for `sa`: `generateName: <sa>-token-`, owned
/// by the SA (so it goes with it), the annotation the token controller needs, and the label
/// the agent finds it by.
pub fn secret_template(sa: &ServiceAccount) -> Secret {
    let name = sa.metadata.name.clone().unwrap_or_default();
    Secret {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-token-")),
            namespace: sa.metadata.namespace.clone(),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "ServiceAccount".to_owned(),
                name: name.clone(),
                uid: sa.metadata.uid.clone().unwrap_or_default(),
                ..OwnerReference::default()
            }]),
            annotations: Some([(SA_NAME_ANNOTATION.to_owned(), name.clone())].into()),
            labels: Some([(SECRET_LABEL.to_owned(), name)].into()),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.to_owned()),
        ..Secret::default()
    }
}

/// Whether `secret` is a token Secret for SA `sa_name` (type and annotation, as Rancher checks).
pub fn is_for(secret: &Secret, sa_name: &str) -> bool {
    secret.type_.as_deref() == Some(SECRET_TYPE)
        && secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SA_NAME_ANNOTATION))
            .map(String::as_str)
            == Some(sa_name)
}

/// `data.token`, whitespace-trimmed, if filled in.
pub fn token_of(secret: &Secret) -> Option<String> {
    let raw = secret.data.as_ref()?.get(TOKEN_KEY)?;
    let token = std::str::from_utf8(&raw.0).ok()?.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

fn name_of(secret: &Secret) -> String {
    secret.metadata.name.clone().unwrap_or_default()
}

/// Finds or creates the token Secret of `settings.service_account` (see the module diagram).
pub async fn ensure_secret(
    client: &kube::Client,
    settings: &TokenSettings,
) -> Result<Secret, KubeError> {
    let ns = &settings.namespace;
    let sa_name = &settings.service_account;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let sa = call(
        format!("get serviceaccount {ns}/{sa_name}"),
        sas.get(sa_name),
    )
    .await?;
    let lp = ListParams::default().labels(&format!("{SECRET_LABEL}={sa_name}"));
    let listed = call(format!("list secrets in {ns}"), secrets.list(&lp)).await?;
    let mut found = None;
    for s in listed.items {
        if is_for(&s, sa_name) {
            found.get_or_insert(s);
            continue;
        }
        let name = name_of(&s);
        tracing::warn!(secret = %format!("{ns}/{name}"), "secret labelled for service account {sa_name} is not its token secret; deleting it");
        if let Err(error) = call(
            format!("delete secret {ns}/{name}"),
            secrets.delete(&name, &DeleteParams::default()),
        )
        .await
        {
            tracing::warn!(%error, "cannot delete the invalid token secret");
        }
    }
    if let Some(s) = found {
        return Ok(s);
    }
    let created = call(
        format!("create token secret for {ns}/{sa_name}"),
        secrets.create(&PostParams::default(), &secret_template(&sa)),
    )
    .await?;
    let created_name = name_of(&created);
    tracing::info!(secret = %format!("{ns}/{created_name}"), "created the token secret of service account {sa_name}");
    let has_ref = sa
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.get(SECRET_REF_ANNOTATION).is_some_and(|v| !v.is_empty()));
    if has_ref {
        return Ok(created);
    }
    let mut annotated = sa.clone();
    annotated
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            SECRET_REF_ANNOTATION.to_owned(),
            format!("{ns}/{created_name}"),
        );
    match call(
        format!("annotate serviceaccount {ns}/{sa_name}"),
        sas.replace(sa_name, &PostParams::default(), &annotated),
    )
    .await
    {
        Ok(_) => Ok(created),
        // Another replica annotated the SA first: ours goes, theirs is used.
        Err(e) if e.status() == Some(409) => {
            tracing::info!(secret = %created_name, "another writer annotated service account {sa_name} first; using its secret");
            let _ = call(
                format!("delete secret {ns}/{created_name}"),
                secrets.delete(&created_name, &DeleteParams::default()),
            )
            .await;
            let sa = call(
                format!("get serviceaccount {ns}/{sa_name}"),
                sas.get(sa_name),
            )
            .await?;
            let reference = sa
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SECRET_REF_ANNOTATION))
                .cloned()
                .unwrap_or_default();
            let Some((ref_ns, ref_name)) = reference.split_once('/') else {
                return Err(e);
            };
            let api: Api<Secret> = Api::namespaced(client.clone(), ref_ns);
            call(format!("get secret {reference}"), api.get(ref_name)).await
        }
        Err(e) => Err(e),
    }
}

/// Polls `secret` until its `data.token` is filled, for at most `bound` (100 ms doubling to
/// 1 s between reads). `Ok(None)` when the bound passes.
pub async fn wait_for_token(
    client: &kube::Client,
    namespace: &str,
    secret: &Secret,
    bound: Duration,
) -> Result<Option<String>, KubeError> {
    if let Some(t) = token_of(secret) {
        return Ok(Some(t));
    }
    let name = name_of(secret);
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let started = tokio::time::Instant::now();
    let deadline = started + bound;
    tracing::info!(
        secret = %format!("{namespace}/{name}"),
        ?bound,
        "waiting for the token controller (kube-controller-manager) to fill the secret's token"
    );
    let mut pause = Duration::from_millis(100);
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_secs(1));
        let s = call(format!("get secret {namespace}/{name}"), api.get(&name)).await?;
        if let Some(t) = token_of(&s) {
            tracing::info!(secret = %format!("{namespace}/{name}"), waited = ?started.elapsed(), "got the service account token from the secret");
            return Ok(Some(t));
        }
    }
}

// === what is reported ===

fn projected(settings: &TokenSettings, fallback: &str) -> Reported {
    let token = settings
        .projected_file
        .as_deref()
        .and_then(|p| crate::kube::read_token(p).ok())
        .unwrap_or_else(|| fallback.to_owned());
    Reported::Projected { token }
}

/// The token to report at start: the Secret's once the token controller filled it (waiting at
/// most `settings.wait`), else the projected token `projected_token`, with one WARN saying why.
pub async fn initial(
    client: &kube::Client,
    settings: &TokenSettings,
    projected_token: &str,
) -> Reported {
    let why = match ensure_secret(client, settings).await {
        Ok(secret) => {
            match wait_for_token(client, &settings.namespace, &secret, settings.wait).await {
                Ok(Some(token)) => {
                    return Reported::Secret {
                        name: name_of(&secret),
                        token,
                    };
                }
                Ok(None) => format!(
                    "the token controller did not fill secret {}/{} within {:?} (is kube-controller-manager with its serviceaccount-token controller running?)",
                    settings.namespace,
                    name_of(&secret),
                    settings.wait
                ),
                Err(e) => e.to_string(),
            }
        }
        Err(e) => e.to_string(),
    };
    tracing::warn!(
        recheck = ?settings.recheck,
        "reporting the pod's projected service account token, which the kubelet rotates and the apiserver expires: {why}; checking again periodically"
    );
    Reported::Projected {
        token: projected_token.to_owned(),
    }
}

/// One re-check: the Secret's token if it has one now; else the projected token (re-read). An
/// API error keeps a Secret's token (its Secret still exists as far as we know).
pub async fn recheck(
    client: &kube::Client,
    settings: &TokenSettings,
    current: &Reported,
) -> Reported {
    match ensure_secret(client, settings).await {
        Ok(secret) => match token_of(&secret) {
            Some(token) => Reported::Secret {
                name: name_of(&secret),
                token,
            },
            None => projected(settings, current.token()),
        },
        Err(error) => {
            tracing::debug!(%error, "re-checking the token secret failed");
            match current {
                Reported::Secret { .. } => current.clone(),
                Reported::Projected { token } => projected(settings, token),
            }
        }
    }
}

/// Re-checks every `settings.recheck` until `cancel` fires, sending each change of the
/// reported token on `tx` (with one log line saying from what to what).
pub async fn watch(
    client: kube::Client,
    settings: TokenSettings,
    tx: watch::Sender<Reported>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(settings.recheck) => {}
        }
        let current = tx.borrow().clone();
        let next = tokio::select! {
            () = cancel.cancelled() => return,
            next = recheck(&client, &settings, &current) => next,
        };
        if next == current {
            continue;
        }
        match (&current, &next) {
            (_, Reported::Projected { .. }) if matches!(current, Reported::Secret { .. }) => {
                tracing::warn!(from = %current.source(), "the token secret has no token any more; reporting the projected token")
            }
            _ => {
                tracing::info!(from = %current.source(), to = %next.source(), "the reported service account token changed")
            }
        }
        if tx.send(next).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn sa() -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some("cattle".into()),
                namespace: Some("cattle-system".into()),
                uid: Some("uid-1".into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        }
    }

    #[test]
    fn template_is_rancher_s() {
        let s = secret_template(&sa());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["metadata"]["generateName"], "cattle-token-");
        assert_eq!(v["metadata"]["namespace"], "cattle-system");
        assert_eq!(
            v["metadata"]["annotations"]["kubernetes.io/service-account.name"],
            "cattle"
        );
        assert_eq!(
            v["metadata"]["labels"]["cattle.io/service-account.name"],
            "cattle"
        );
        let owner = &v["metadata"]["ownerReferences"][0];
        assert_eq!(
            (
                &owner["kind"],
                &owner["name"],
                &owner["uid"],
                &owner["apiVersion"]
            ),
            (
                &"ServiceAccount".into(),
                &"cattle".into(),
                &"uid-1".into(),
                &"v1".into()
            )
        );
        assert_eq!(v["type"], "kubernetes.io/service-account-token");
        assert!(v.get("data").is_none());
        assert!(is_for(&s, "cattle"));
        assert!(!is_for(&s, "other"));
        let mut opaque = s.clone();
        opaque.type_ = Some("Opaque".into());
        assert!(
            !is_for(&opaque, "cattle"),
            "the type matters, as in Rancher"
        );
    }

    #[test]
    fn token_is_trimmed_and_empty_is_none() {
        let mut s = secret_template(&sa());
        assert_eq!(token_of(&s), None);
        s.data = Some([(TOKEN_KEY.to_owned(), ByteString(b" \n".to_vec()))].into());
        assert_eq!(token_of(&s), None);
        s.data = Some([(TOKEN_KEY.to_owned(), ByteString(b"jwt.a.b\n".to_vec()))].into());
        assert_eq!(token_of(&s).as_deref(), Some("jwt.a.b"));
    }

    #[test]
    fn reported_debug_hides_the_token() {
        let r = Reported::Secret {
            name: "cattle-token-x".into(),
            token: "sekret".into(),
        };
        assert!(!format!("{r:?}").contains("sekret"));
        assert_eq!(r.token(), "sekret");
        assert_eq!(r.source(), "secret cattle-token-x");
        let p = Reported::Projected { token: "p".into() };
        assert!(!format!("{p:?}").contains('p') || format!("{p:?}") == "Projected");
    }

    #[test]
    fn fallback_re_reads_the_projected_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "rotated\n").unwrap();
        let mut settings = TokenSettings {
            namespace: "cattle-system".into(),
            service_account: SERVICE_ACCOUNT.into(),
            wait: DEFAULT_WAIT,
            recheck: DEFAULT_RECHECK,
            projected_file: Some(file.clone()),
        };
        assert_eq!(projected(&settings, "old").token(), "rotated");
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            projected(&settings, "old").token(),
            "old",
            "unreadable: keep"
        );
        settings.projected_file = None;
        assert_eq!(projected(&settings, "old").token(), "old");
    }
}
