//! TLS for both ports: server configs built from PEM files and rebuilt when the files change
//! (cert-manager rotates them in place), the accept helpers both ports share, and the names a
//! client certificate speaks for (mTLS identity).
//!
//! A rotation only affects new connections: an open connection keeps the session it made, so
//! long-lived task streams are not dropped.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use rustls::{
    ServerConfig,
    pki_types::{
        CertificateDer, PrivateKeyDer,
        pem::{self, PemObject},
    },
    server::WebPkiClientVerifier,
};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::TlsConfig;

pub use coordinator_worker::client::install_crypto_provider;

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which port a config is for: gRPC asks for client certificates when configured; HTTP never
/// does (probes and Prometheus do not carry them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Grpc,
    Http,
}

/// A server config that follows its files. Cheap to clone; every clone sees reloads.
#[derive(Clone)]
pub struct ReloadingConfig {
    files: TlsConfig,
    port: Port,
    current: Arc<RwLock<Arc<ServerConfig>>>,
    fingerprint: Arc<RwLock<[u8; 32]>>,
}

impl std::fmt::Debug for ReloadingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingConfig").field("port", &self.port).finish_non_exhaustive()
    }
}

impl ReloadingConfig {
    /// Reads the files now; an error names the file or what is wrong with it.
    pub fn load(files: &TlsConfig, port: Port) -> anyhow::Result<Self> {
        let (config, fingerprint) = build(files, port)?;
        Ok(Self {
            files: files.clone(),
            port,
            current: Arc::new(RwLock::new(Arc::new(config))),
            fingerprint: Arc::new(RwLock::new(fingerprint)),
        })
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls config lock").clone()
    }

    /// Re-reads the files; swaps the config in when they changed and still make a valid one.
    /// Returns whether a new config was installed.
    pub fn reload(&self) -> bool {
        match fingerprint(&self.files) {
            Ok(f) if f == *self.fingerprint.read().expect("tls fingerprint lock") => return false,
            Ok(_) => {}
            Err(error) => {
                warn!(port = ?self.port, cert_file = %self.files.cert_file, error = format!("{error:#}"),
                      "tls files unreadable; keeping the current certificate");
                return false;
            }
        }
        match build(&self.files, self.port) {
            Ok((config, f)) => {
                *self.current.write().expect("tls config lock") = Arc::new(config);
                *self.fingerprint.write().expect("tls fingerprint lock") = f;
                info!(port = ?self.port, cert_file = %self.files.cert_file, "tls certificates reloaded");
                true
            }
            Err(error) => {
                warn!(
                    port = ?self.port,
                    cert_file = %self.files.cert_file,
                    error = format!("{error:#}"),
                    "new tls files are not usable; keeping the current certificate"
                );
                false
            }
        }
    }

    /// Checks the files every `interval` until `stop`.
    pub async fn watch(self, interval: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    self.reload();
                }
            }
        }
    }

    /// Completes a server handshake on `tcp` with the current config, within
    /// [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let acceptor = TlsAcceptor::from(self.current());
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "tls handshake timed out")),
        }
    }
}

fn read(key: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{key} {path}"))
}

fn fingerprint(files: &TlsConfig) -> anyhow::Result<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(read("tls.cert_file", &files.cert_file)?);
    h.update(read("tls.key_file", &files.key_file)?);
    if !files.client_ca_file.is_empty() {
        h.update(read("tls.client_ca_file", &files.client_ca_file)?);
    }
    Ok(h.finalize().into())
}

/// PEM certificates from `path`; at least one.
pub fn load_certs(key: &str, path: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{key} {path}: not PEM"))?;
    anyhow::ensure!(!certs.is_empty(), "{key} {path}: no certificate in the file");
    Ok(certs)
}

fn load_key(path: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read("tls.key_file", path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => anyhow::bail!("tls.key_file {path}: no private key in the file"),
        Err(e) => Err(e).with_context(|| format!("tls.key_file {path}: not PEM")),
    }
}

fn build(files: &TlsConfig, port: Port) -> anyhow::Result<(ServerConfig, [u8; 32])> {
    install_crypto_provider();
    let f = fingerprint(files)?;
    let certs = load_certs("tls.cert_file", &files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let builder = ServerConfig::builder();
    let builder = if port == Port::Grpc && !files.client_ca_file.is_empty() {
        let mut roots = rustls::RootCertStore::empty();
        for ca in load_certs("tls.client_ca_file", &files.client_ca_file)? {
            roots.add(ca).with_context(|| format!("tls.client_ca_file {}", files.client_ca_file))?;
        }
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
        let verifier = if files.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
        builder.with_client_cert_verifier(
            verifier.build().with_context(|| format!("tls.client_ca_file {}", files.client_ca_file))?,
        )
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .with_context(|| format!("tls.cert_file {} and tls.key_file {}", files.cert_file, files.key_file))?;
    config.alpn_protocols = match port {
        Port::Grpc => vec![b"h2".to_vec()],
        Port::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok((config, f))
}

/// The next connection on `listener`. Accept errors (out of file descriptors, a connection
/// reset before it was accepted) are logged and retried after a short pause.
pub async fn accept(listener: &TcpListener, port: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(a) => return a,
            Err(error) => {
                warn!(%error, port, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `TCP_NODELAY` and TCP keepalive on an accepted socket.
pub fn tune_socket(tcp: &TcpStream, keepalive: Duration) {
    let _ = tcp.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new().with_time(keepalive).with_interval(keepalive);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// The names a client certificate speaks for: its subject CN and its DNS and URI SANs.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_owned)).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::URI(s) => names.push((*s).to_owned()),
                _ => {}
            }
        }
    }
    names
}

/// The peer address and client-certificate names of a call, from tonic's connect info (which
/// the gRPC server puts in every request).
pub fn peer_of(ext: &http::Extensions) -> (Option<SocketAddr>, Option<Vec<String>>) {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    if let Some(info) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
        let names = info.peer_certs().and_then(|c| c.first().map(|leaf| cert_names(leaf)));
        return (info.get_ref().remote_addr(), names);
    }
    (ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, as PEM.
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    #[test]
    fn certificates_and_keys_load_from_pem_and_mistakes_name_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair();
        let both = file(&dir, "both.pem", &format!("{cert}{key}"));
        assert_eq!(load_certs("tls.cert_file", &both).unwrap().len(), 1);
        load_key(&both).unwrap();

        let only_cert = file(&dir, "cert.pem", &cert);
        let e = load_key(&only_cert).unwrap_err().to_string();
        assert_eq!(e, format!("tls.key_file {only_cert}: no private key in the file"));
        let only_key = file(&dir, "key.pem", &key);
        let e = load_certs("tls.cert_file", &only_key).unwrap_err().to_string();
        assert_eq!(e, format!("tls.cert_file {only_key}: no certificate in the file"));

        let broken = file(
            &dir,
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        );
        let e = format!("{:#}", load_certs("tls.cert_file", &broken).unwrap_err());
        assert!(e.starts_with(&format!("tls.cert_file {broken}: not PEM")), "{e}");
        let e = load_certs("tls.client_ca_file", "/nonexistent/ca.pem").unwrap_err().to_string();
        assert_eq!(e, "tls.client_ca_file /nonexistent/ca.pem");
    }
}
