//! A TLS terminator in front of a plaintext listener (the collector has no TLS receiver), and
//! the certificates it needs, made at test time: a CA, a server certificate for `localhost`
//! and `127.0.0.1`, and a client certificate, both signed by the CA.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    rustls::{
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
        server::WebPkiClientVerifier,
        RootCertStore, ServerConfig,
    },
    TlsAcceptor,
};

/// The CA, the server's certificate and key (in memory, for the terminator) and the files a
/// client is configured with.
pub struct TestPki {
    /// PEM of the CA certificate.
    pub ca: PathBuf,
    /// PEM of the client certificate, signed by the CA.
    pub client_cert: PathBuf,
    /// PEM (PKCS#8) of the client certificate's key.
    pub client_key: PathBuf,
    /// PEM of the server certificate (`localhost`, `127.0.0.1`) and its key, for a server that
    /// terminates TLS itself.
    pub server_cert_pem: PathBuf,
    pub server_key_pem: PathBuf,
    ca_der: CertificateDer<'static>,
    server_cert: CertificateDer<'static>,
    server_key: PrivatePkcs8KeyDer<'static>,
    _dir: tempfile::TempDir,
}

impl TestPki {
    pub fn generate() -> TestPki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(DnType::CommonName, "inferscope test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(names).unwrap();
            p.extended_key_usages = vec![usage];
            (p.signed_by(&key, &issuer).unwrap(), key)
        };
        // rcgen turns a name that parses as an address into an IP SAN.
        let (server, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = leaf(
            vec!["inferscope-agent".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        TestPki {
            ca: write("ca.pem", ca_cert.pem()),
            client_cert: write("client.pem", client.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
            server_cert_pem: write("server.pem", server.pem()),
            server_key_pem: write("server.key", server_key.serialize_pem()),
            ca_der: ca_cert.der().clone(),
            server_cert: server.der().clone(),
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
            _dir: dir,
        }
    }
}

/// Whether the terminator asks for a client certificate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClientAuth {
    None,
    /// A certificate signed by the test CA, or the handshake fails.
    Required,
}

/// Accepts TLS on `127.0.0.1:port` and copies the decrypted bytes to and from a plaintext
/// port. Counts handshakes, so a test can tell "rejected by TLS" from "never connected".
pub struct TlsProxy {
    pub port: u16,
    ok: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TlsProxy {
    pub fn start(pki: &TestPki, upstream: u16, auth: ClientAuth) -> TlsProxy {
        // The ring provider, as the agent uses; named explicitly so that no process-wide
        // default has to be installed.
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Required => {
                let mut roots = RootCertStore::empty();
                roots.add(pki.ca_der.clone()).unwrap();
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(
                vec![pki.server_cert.clone()],
                PrivateKeyDer::Pkcs8(pki.server_key.clone_key()),
            )
            .unwrap();
        // gRPC clients refuse a connection on which h2 was not negotiated. HTTP clients that
        // offer h2 get it too, so the plaintext side must take HTTP/2 without an upgrade
        // (the collector's HTTP receiver does).
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (ok2, errors2) = (ok.clone(), errors.clone());
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, ok, errors) = (acceptor.clone(), ok2.clone(), errors2.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(mut tls) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                            }
                        }
                        Err(e) => errors.lock().unwrap().push(e.to_string()),
                    }
                });
            }
        });
        TlsProxy {
            port,
            ok,
            errors,
            rt: Some(rt),
        }
    }

    /// Handshakes that completed (with a verified client certificate when required).
    pub fn handshakes_ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Why each failed handshake failed, as rustls reported it.
    pub fn handshake_errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
