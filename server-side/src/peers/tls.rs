//! Mutual TLS between replicas: each issues itself a certificate from the server's CA (the one
//! in the store, which every replica shares) at start, presents it on both ends, and accepts
//! only peers whose certificate that CA signed.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::PeerError;
use crate::store::Store;

/// Both ends' TLS configurations.
#[derive(Clone)]
pub struct PeerTls {
    /// The peer listener's: requires a client certificate from the CA.
    pub server: Arc<rustls::ServerConfig>,
    /// For dialing peers: trusts only the CA, presents this replica's certificate.
    pub client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Issues `replica`'s certificate for `host` (its peer address's host) from the store's
    /// CA (created with the server's PKI if there is none yet: a server without generated
    /// TLS still needs a CA its replicas share).
    pub fn issue(store: &dyn Store, replica: &str, host: &str) -> Result<Self, PeerError> {
        let pki = match store.pki()? {
            Some(pki) => pki,
            None => crate::pki::ensure(store, &["localhost".to_owned()])?,
        };
        let (cert_pem, key_pem) =
            crate::pki::peer_cert(&pki, &format!("replica {replica}"), &[host.to_owned()])?;
        let err = |e: &dyn std::fmt::Display| PeerError::Tls(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pki.ca_cert_pem.as_bytes()) {
            roots.add(cert.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
        }
        let roots = Arc::new(roots);
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(&e))?;
        let key = || PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| err(&e));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| err(&e))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key()?)
            .map_err(|e| err(&e))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| err(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key()?)
            .map_err(|e| err(&e))?;
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    /// Two replicas' certificates from one CA make a mutual TLS connection; a certificate
    /// from another CA is refused by the listener.
    #[tokio::test]
    async fn replicas_of_one_ca_connect_and_others_are_refused() {
        let store = SqliteStore::open_in_memory().unwrap();
        crate::pki::ensure(&store, &["localhost".to_owned()]).unwrap();
        let a = PeerTls::issue(&store, "a", "127.0.0.1").unwrap();
        let b = PeerTls::issue(&store, "b", "127.0.0.1").unwrap();
        let stranger_store = SqliteStore::open_in_memory().unwrap();
        let stranger = PeerTls::issue(&stranger_store, "x", "127.0.0.1").unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(a.server.clone());
        let server = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                results.push(acceptor.accept(tcp).await.is_ok());
            }
            results
        });
        let dial = |tls: PeerTls| async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut conn = tokio_rustls::TlsConnector::from(tls.client)
                .connect(name, tcp)
                .await?;
            // TLS 1.3: the server's verdict on the client certificate comes with the first read.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            conn.write_all(b"x").await?;
            let mut buf = [0u8; 1];
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(500), conn.read(&mut buf))
                    .await;
            Ok::<_, std::io::Error>(())
        };
        dial(b).await.unwrap();
        // The stranger's client refuses A's certificate (another CA) or A refuses its own.
        let _ = dial(stranger).await;
        assert_eq!(server.await.unwrap(), [true, false]);
    }
}
