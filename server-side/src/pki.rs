//! The server's own CA and serving certificate, created with rcgen on first start and kept in
//! the store, so agents pinning the CA checksum keep working across restarts.
//!
//! The serving certificate is reissued (by the same CA) when the names it must cover change,
//! e.g. after `--server-url` moved to another host name.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::store::{ServerPki, Store, StoreError};

/// Why the PKI could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Common name of the generated CA.
const CA_COMMON_NAME: &str = "tunnel-server-ca";

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "tunnel-server");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn serving_cert(sans: &[String], ca_key: &KeyPair) -> Result<(String, String), rcgen::Error> {
    let mut params = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "tunnel-server");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate for one replica's peer channel ([`crate::peers`]): signed by the server's
/// CA, good for both ends of mutual TLS (server and client authentication), naming `sans`
/// (the replica's peer address host) with `common_name` (the replica). Returns (cert, key) PEM.
pub fn peer_cert(
    pki: &ServerPki,
    common_name: &str,
    sans: &[String],
) -> Result<(String, String), PkiError> {
    let mut params = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "tunnel-server-peers");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let ca_key = KeyPair::from_pem(&pki.ca_key_pem)?;
    let key = KeyPair::generate()?;
    let issuer = Issuer::new(ca_params(), &ca_key);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Loads the PKI from the store, creating the CA on first start and (re)issuing the serving
/// certificate when `sans` differ from the stored one's.
pub fn ensure(store: &dyn Store, sans: &[String]) -> Result<ServerPki, PkiError> {
    let mut sans = sans.to_vec();
    sans.sort();
    sans.dedup();
    match store.pki()? {
        Some(pki) if pki.sans == sans => Ok(pki),
        Some(mut pki) => {
            tracing::info!(
                ?sans,
                "server names changed; reissuing the serving certificate"
            );
            let ca_key = KeyPair::from_pem(&pki.ca_key_pem)?;
            let (cert_pem, key_pem) = serving_cert(&sans, &ca_key)?;
            pki.cert_pem = cert_pem;
            pki.key_pem = key_pem;
            pki.sans = sans;
            store.set_pki(&pki)?;
            Ok(pki)
        }
        None => {
            tracing::info!(?sans, "creating the server CA and serving certificate");
            let ca_key = KeyPair::generate()?;
            let ca_cert = ca_params().self_signed(&ca_key)?;
            let (cert_pem, key_pem) = serving_cert(&sans, &ca_key)?;
            let pki = ServerPki {
                ca_cert_pem: ca_cert.pem(),
                ca_key_pem: ca_key.serialize_pem(),
                cert_pem,
                key_pem,
                sans,
            };
            store.set_pki(&pki)?;
            Ok(pki)
        }
    }
}

/// The value of Rancher's `cacerts` setting: the CA PEM, trimmed.
pub fn cacerts_value(ca_pem: &str) -> String {
    ca_pem.trim().to_owned()
}

/// `CATTLE_CA_CHECKSUM` for a `cacerts` value: hex SHA-256 of the value plus `\n`
/// (`systemtemplate.CAChecksum`); empty when there is no CA.
pub fn ca_checksum(cacerts: &str) -> String {
    if cacerts.is_empty() {
        return String::new();
    }
    crate::tokens::sha256_hex(format!("{cacerts}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn created_once_and_reissued_on_new_names() {
        let store = SqliteStore::open_in_memory().unwrap();
        let a = ensure(&store, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let b = ensure(&store, &["127.0.0.1".into(), "localhost".into()]).unwrap();
        assert_eq!(a, b);
        let c = ensure(&store, &["example.com".into()]).unwrap();
        assert_eq!(a.ca_cert_pem, c.ca_cert_pem);
        assert_ne!(a.cert_pem, c.cert_pem);
        // The pair makes a working rustls config.
        tunnel_proto::driver::acceptor::tls_server_config(
            format!("{}{}", c.cert_pem, c.ca_cert_pem).as_bytes(),
            c.key_pem.as_bytes(),
        )
        .unwrap();
        assert_eq!(ca_checksum("").len(), 0);
        assert_eq!(ca_checksum("x").len(), 64);
    }
}
