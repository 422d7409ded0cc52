//! Which server certificates the connector believes.
//!
//! An agent dials a management server that is often signed by a private CA, so "trust the web
//! PKI" is rarely enough. Rancher's agents solve this with `CATTLE_CA_CHECKSUM`: the import
//! manifest carries the SHA-256 of the server's `cacerts` setting plus one newline, the agent
//! fetches that setting itself, checks the hash, and only then trusts the PEM it fetched. This
//! module reproduces that scheme ([`Trust::PinnedCa`]), and adds a variant that needs no fetch:
//! the pin is compared with the CA certificates the server presents during the TLS handshake
//! ([`Trust::PinnedPresentedCa`]). Both end in ordinary WebPKI path validation against the pinned
//! CA, so a pin never weakens name or expiry checks; it only narrows whom we trust.
//!
//! A checksum mismatch is always an error value naming both checksums. Nothing here falls back
//! to another trust mode by itself.

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// How the connector decides whether to believe a `wss://` server's certificate.
///
/// Default: [`Trust::SystemRoots`].
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Trust {
    /// The platform's certificate store, loaded with `rustls-native-certs` (on Linux:
    /// `/etc/ssl/certs` and friends, or `SSL_CERT_FILE`/`SSL_CERT_DIR`). Chosen over a compiled-in
    /// Mozilla list because operators add their private CAs to the platform store.
    #[default]
    SystemRoots,
    /// Only the CA certificates of this PEM bundle (plus the system roots if
    /// `with_system_roots`).
    CaBundle {
        /// One or more PEM `CERTIFICATE` blocks.
        pem: Vec<u8>,
        /// Also trust the platform store.
        with_system_roots: bool,
    },
    /// Rancher's `CATTLE_CA_CHECKSUM` scheme. The caller fetched the server's CA PEM (the `value`
    /// of `/v3/settings/cacerts`) and passes it with the expected checksum;
    /// [`Connector::new`](super::Connector::new) checks
    /// `sha256(ca_pem + "\n") == checksum` and then trusts only that CA (plus the system roots if
    /// `with_system_roots`). A mismatch is [`TlsConfigError::CaChecksumMismatch`].
    PinnedCa {
        /// Lower-case hex SHA-256 of `ca_pem` plus one newline. Surrounding whitespace is
        /// ignored and upper-case hex is accepted.
        checksum: String,
        /// The PEM exactly as fetched (the setting is stored trimmed; do not append the newline).
        ca_pem: String,
        /// Also trust the platform store. Rancher's own websocket dialer does (system pool plus
        /// `serverca`); `false` is the stricter choice.
        with_system_roots: bool,
    },
    /// A `CATTLE_CA_CHECKSUM`-style pin checked against the CA certificates the server presents
    /// in its TLS handshake, for when the caller has no PEM. Each presented non-leaf
    /// certificate, and each contiguous run of them, is PEM-encoded the way Go's `pem.Encode`
    /// does (64-column base64) and hashed; the first run whose hash equals `checksum` becomes the
    /// only trust anchor, and the chain is then validated normally against it. The server must
    /// therefore send its CA in the chain; a server that sends only its leaf cannot be pinned
    /// this way. A mismatch fails the handshake with [`ConnectError::PresentedCaMismatch`]
    /// naming the expected and every presented checksum.
    ///
    /// [`ConnectError::PresentedCaMismatch`]: super::ConnectError::PresentedCaMismatch
    PinnedPresentedCa {
        /// Lower-case hex SHA-256 (whitespace ignored, upper case accepted).
        checksum: String,
    },
    /// No verification at all. Only for explicit operator opt-in; a warning is logged each
    /// time a connector is built with it.
    InsecureSkipVerify,
}

impl fmt::Debug for Trust {
    // Hand-written so a Debug print of a config does not dump a whole PEM bundle.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SystemRoots => f.write_str("SystemRoots"),
            Self::CaBundle {
                pem,
                with_system_roots,
            } => f
                .debug_struct("CaBundle")
                .field("pem_len", &pem.len())
                .field("with_system_roots", with_system_roots)
                .finish(),
            Self::PinnedCa {
                checksum,
                ca_pem,
                with_system_roots,
            } => f
                .debug_struct("PinnedCa")
                .field("checksum", checksum)
                .field("ca_pem_len", &ca_pem.len())
                .field("with_system_roots", with_system_roots)
                .finish(),
            Self::PinnedPresentedCa { checksum } => f
                .debug_struct("PinnedPresentedCa")
                .field("checksum", checksum)
                .finish(),
            Self::InsecureSkipVerify => f.write_str("InsecureSkipVerify"),
        }
    }
}

/// Why a TLS client configuration could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// `sha256(ca_pem + "\n")` is not the checksum the caller expected.
    #[error(
        "CA checksum mismatch: expected {expected} (CATTLE_CA_CHECKSUM), the CA PEM given hashes to {actual}"
    )]
    CaChecksumMismatch {
        /// The checksum the caller asked for (normalised to lower case).
        expected: String,
        /// `sha256(ca_pem + "\n")` of the PEM the caller passed.
        actual: String,
    },
    /// The checksum is not 64 hex digits.
    #[error("CA checksum {0:?} is not 64 hex digits")]
    BadChecksum(String),
    /// The PEM holds no certificate, or a certificate rustls/webpki cannot use as a trust anchor.
    #[error("invalid CA certificate PEM: {0}")]
    InvalidCa(String),
    /// The platform store yielded no usable certificate.
    #[error("no usable certificate in the system trust store ({0})")]
    NoSystemRoots(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The checksum Rancher puts in `CATTLE_CA_CHECKSUM`: lower-case hex SHA-256 of `ca_pem`
/// followed by one newline.
///
/// `ca_pem` is the `cacerts` setting's value as served (Rancher stores it trimmed), so the
/// newline is appended here, as `run.sh` does with `jq -r`. No trimming is done.
pub fn ca_checksum(ca_pem: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(ca_pem.as_bytes());
    ctx.update(b"\n");
    hex_lower(ctx.finish().as_ref())
}

fn hex_lower(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// Normalises a caller's checksum: trims whitespace (secrets often end in a newline), lower-cases.
fn normalise_checksum(raw: &str) -> Result<String, TlsConfigError> {
    let sum = raw.trim().to_ascii_lowercase();
    if sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sum)
    } else {
        Err(TlsConfigError::BadChecksum(raw.to_owned()))
    }
}

/// PEM-encodes one DER certificate the way Go's `pem.Encode` does: 64-column base64 lines, every
/// line (including the END line) terminated by `\n`.
fn pem_encode(der: &[u8]) -> String {
    let b64 = data_encoding::BASE64.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::InvalidCa(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsConfigError::InvalidCa(
            "no CERTIFICATE block found".to_owned(),
        ));
    }
    Ok(certs)
}

fn add_system_roots(roots: &mut RootCertStore) -> Result<(), TlsConfigError> {
    let loaded = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        let why = if loaded.errors.is_empty() {
            "store is empty".to_owned()
        } else {
            loaded
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        };
        return Err(TlsConfigError::NoSystemRoots(why));
    }
    for err in &loaded.errors {
        tracing::debug!(error = %err, "skipped part of the system trust store");
    }
    Ok(())
}

fn roots_from_pem(pem: &[u8], with_system_roots: bool) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_pem_certs(pem)? {
        roots
            .add(cert)
            .map_err(|e| TlsConfigError::InvalidCa(e.to_string()))?;
    }
    if with_system_roots {
        add_system_roots(&mut roots)?;
    }
    Ok(roots)
}

/// Builds the rustls client configuration for `trust`: ring provider, TLS 1.2 and 1.3, ALPN
/// `http/1.1` (a websocket upgrade needs HTTP/1.1, and so does any other HTTP/1.1 client that
/// uses it).
///
/// [`Connector::new`](super::Connector::new) calls this for `wss://` URLs; it is public so that
/// an application's other HTTPS requests to the same server (an agent's pre-flight GETs) trust
/// exactly what its tunnel trusts, through the same code.
///
/// Errors: [`TlsConfigError::CaChecksumMismatch`] and [`TlsConfigError::BadChecksum`] for a
/// [`Trust::PinnedCa`] that does not check out, [`TlsConfigError::InvalidCa`] for a PEM without
/// a usable certificate, [`TlsConfigError::NoSystemRoots`] when the platform store is asked for
/// and yields nothing. [`Trust::InsecureSkipVerify`] builds without a word here; the connector
/// logs its warning when it is built with it.
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::Rustls(e.to_string()))?;
    let mut config = match trust {
        Trust::SystemRoots => {
            let mut roots = RootCertStore::empty();
            add_system_roots(&mut roots)?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::CaBundle {
            pem,
            with_system_roots,
        } => builder
            .with_root_certificates(roots_from_pem(pem, *with_system_roots)?)
            .with_no_client_auth(),
        Trust::PinnedCa {
            checksum,
            ca_pem,
            with_system_roots,
        } => {
            let expected = normalise_checksum(checksum)?;
            let actual = ca_checksum(ca_pem);
            if expected != actual {
                return Err(TlsConfigError::CaChecksumMismatch { expected, actual });
            }
            builder
                .with_root_certificates(roots_from_pem(ca_pem.as_bytes(), *with_system_roots)?)
                .with_no_client_auth()
        }
        Trust::PinnedPresentedCa { checksum } => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                chain: PresentedCaPin {
                    expected: normalise_checksum(checksum)?,
                },
                provider,
            }))
            .with_no_client_auth(),
        Trust::InsecureSkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                chain: AnyChain,
                provider,
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// === impl Verifier ===

/// What differs between the custom verifiers: whether to believe the presented chain.
/// Handshake signatures are checked the same way for every mode, once, by [`Verifier`].
trait ChainCheck: fmt::Debug + Send + Sync {
    /// [`ServerCertVerifier::verify_server_cert`], with the verifier's crypto provider.
    fn check_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
        provider: &Arc<CryptoProvider>,
    ) -> Result<ServerCertVerified, rustls::Error>;
}

/// A rustls verifier made of a [`ChainCheck`] and the provider's signature algorithms. Even
/// [`Trust::InsecureSkipVerify`] goes through here, so a handshake is always signed by the key
/// in the certificate it presents.
#[derive(Debug)]
struct Verifier<C> {
    chain: C,
    provider: Arc<CryptoProvider>,
}

impl<C: ChainCheck> ServerCertVerifier for Verifier<C> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain.check_chain(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
            &self.provider,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// === impl PresentedCaPin ===

/// The handshake-time pin of [`Trust::PinnedPresentedCa`].
#[derive(Debug)]
struct PresentedCaPin {
    expected: String,
}

/// The error the presented-CA pin puts inside `rustls::Error::Other`; the connector digs it out
/// again and turns it into [`ConnectError::PresentedCaMismatch`](super::ConnectError).
#[derive(Debug, Clone, thiserror::Error)]
#[error("no CA presented by the server matches checksum {expected}; presented: {presented:?}")]
pub(crate) struct PresentedCaMismatch {
    pub(crate) expected: String,
    pub(crate) presented: Vec<String>,
}

impl PresentedCaPin {
    /// Finds the contiguous run of presented CA certificates whose Go-style PEM encoding hashes
    /// to the pin. Runs, not only single certificates, because a `cacerts` setting may hold an
    /// intermediate followed by its root.
    fn find_anchor<'c>(
        &self,
        intermediates: &'c [CertificateDer<'c>],
    ) -> Result<&'c [CertificateDer<'c>], PresentedCaMismatch> {
        let pems: Vec<String> = intermediates.iter().map(|c| pem_encode(c)).collect();
        let mut presented = Vec::new();
        for start in 0..pems.len() {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            for (end, pem) in pems.iter().enumerate().skip(start) {
                // Go's pem.Encode output already ends in "\n": it equals the trimmed setting plus
                // the newline the checksum appends.
                ctx.update(pem.as_bytes());
                let sum = hex_lower(ctx.clone().finish().as_ref());
                if sum == self.expected {
                    return Ok(&intermediates[start..=end]);
                }
                if end == start {
                    presented.push(sum);
                }
            }
        }
        Err(PresentedCaMismatch {
            expected: self.expected.clone(),
            presented,
        })
    }
}

impl ChainCheck for PresentedCaPin {
    fn check_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
        provider: &Arc<CryptoProvider>,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors = self
            .find_anchor(intermediates)
            .map_err(|e| rustls::Error::Other(rustls::OtherError(Arc::new(e))))?;
        let mut roots = RootCertStore::empty();
        for cert in anchors {
            roots
                .add(cert.clone().into_owned())
                .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
}

// === impl AnyChain ===

/// [`Trust::InsecureSkipVerify`]: accepts any certificate chain; [`Verifier`] still checks that
/// the handshake was signed by the key in it (so it is "unauthenticated", not "broken").
#[derive(Debug)]
struct AnyChain;

impl ChainCheck for AnyChain {
    fn check_chain(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
        _provider: &Arc<CryptoProvider>,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_appends_one_newline() {
        // sha256("abc\n"), as `printf 'abc\n' | sha256sum` prints it.
        assert_eq!(
            ca_checksum("abc"),
            "edeaaff3f1774ad2888673770c6d64097e391bc362d7d6fb34982ddf0efd18cb"
        );
    }

    #[test]
    fn checksum_normalisation() {
        let sum = ca_checksum("x");
        assert_eq!(
            normalise_checksum(&format!(" {}\n", sum.to_uppercase())),
            Ok(sum)
        );
        assert!(matches!(
            normalise_checksum("abc"),
            Err(TlsConfigError::BadChecksum(_))
        ));
    }

    #[test]
    fn client_config_refuses_unusable_trust() {
        let bundle = |pem: &[u8]| Trust::CaBundle {
            pem: pem.to_vec(),
            with_system_roots: false,
        };
        // No CERTIFICATE block at all.
        assert!(matches!(
            client_config(&bundle(b"not a pem")),
            Err(TlsConfigError::InvalidCa(_))
        ));
        // A block whose DER is not a certificate.
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            client_config(&bundle(garbage)),
            Err(TlsConfigError::InvalidCa(_))
        ));
        let wrong = "0".repeat(64);
        assert_eq!(
            client_config(&Trust::PinnedCa {
                checksum: wrong.clone(),
                ca_pem: "x".to_owned(),
                with_system_roots: false,
            })
            .err(),
            Some(TlsConfigError::CaChecksumMismatch {
                expected: wrong,
                actual: ca_checksum("x"),
            })
        );
        assert!(matches!(
            client_config(&Trust::PinnedPresentedCa {
                checksum: "zz".to_owned()
            }),
            Err(TlsConfigError::BadChecksum(_))
        ));
        let insecure = client_config(&Trust::InsecureSkipVerify).expect("insecure builds");
        assert_eq!(insecure.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn pem_encode_wraps_at_64() {
        let pem = pem_encode(&[0u8; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        assert!(pem.ends_with("-----\n"));
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).map(|c| c.to_vec());
        assert_eq!(back.ok(), Some(vec![0u8; 100]));
    }
}
