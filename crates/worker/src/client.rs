//! The client side of the wire, shared by the worker runtime, `coordctl` and the benchmark: the
//! channel (TLS verifying the server with a given CA, an optional client certificate for mTLS),
//! keepalive settings that grpc-go style servers accept, message limits, and the bearer token
//! on every call.

use std::{path::PathBuf, time::Duration};

use tonic::{
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{Error, proto::coordinator_service_client::CoordinatorServiceClient, resend::Resend};

/// A coordinator client that sends the token on every call, and sends again a call that a
/// connection going away turned back unseen ([`Resend`]).
pub type Client = CoordinatorServiceClient<InterceptedService<Resend<Channel>, Bearer>>;

/// HTTP/2 PING interval on an open connection. grpc-go servers by default refuse pings more
/// often than every 5 minutes (`too_many_pings`) and pings on connections without calls; this
/// stays above the first and never pings idle connections.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(330);
/// A PING unanswered this long closes the connection.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The default message limit both ways (tonic's own client default is 4 MiB).
pub const DEFAULT_MAX_MESSAGE: usize = 10 * 1024 * 1024;

/// How to reach and prove ourselves to the coordinator.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// Bearer token (the value after `Bearer `).
    pub token: Option<String>,
    /// PEM CA bundle that signed the server's certificate; with it the endpoint is TLS.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key (mTLS).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name to verify in the server certificate, when it is not the endpoint's host.
    pub server_name: Option<String>,
}

impl ClientSecurity {
    /// A token from `--token`, else from the first line of `--token-file`.
    pub fn read_token(
        token: Option<String>,
        token_file: Option<&std::path::Path>,
    ) -> Result<Option<String>, Error> {
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            return Ok(Some(t.trim().to_owned()));
        }
        match token_file {
            None => Ok(None),
            Some(path) => {
                let t = std::fs::read_to_string(path).map_err(|e| Error::file("token file", path, e))?;
                let t = t.trim();
                if t.is_empty() {
                    return Err(Error::Config(format!("token file {} is empty", path.display())));
                }
                Ok(Some(t.to_owned()))
            }
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Debug, Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, Error> {
        match token {
            None => Ok(Self(None)),
            Some(t) => Ok(Self(Some(
                MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| Error::Config("the token is not printable ASCII".into()))?,
            ))),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// An endpoint for `url` (`http://` or `https://`) with TLS when a CA is given.
pub fn endpoint(url: &str, sec: &ClientSecurity) -> Result<Endpoint, Error> {
    install_crypto_provider();
    // `localhost:9090` parses as a URI with no scheme, which tonic refuses in words that do
    // not say what to write instead.
    if !url.contains("://") {
        return Err(Error::Config(format!(
            "coordinator address {url:?} has no scheme: add http:// or https:// (http://{url})"
        )));
    }
    let mut ep = Endpoint::from_shared(url.to_owned())
        .map_err(|e| Error::Transport { context: format!("invalid coordinator address {url:?}"), source: e })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(false);
    let https = url.starts_with("https://");
    if https || sec.ca_file.is_some() {
        if !https {
            return Err(Error::Config(format!(
                "a CA file is given but the coordinator address {url:?} is not https://"
            )));
        }
        let mut tls = ClientTlsConfig::new();
        match &sec.ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| Error::file("CA file", ca, e))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            None => tls = tls.with_enabled_roots(),
        }
        match (&sec.cert_file, &sec.key_file) {
            (Some(cert), Some(key)) => {
                let c = std::fs::read(cert).map_err(|e| Error::file("client certificate", cert, e))?;
                let k = std::fs::read(key).map_err(|e| Error::file("client key", key, e))?;
                tls = tls.identity(Identity::from_pem(c, k));
            }
            (None, None) => {}
            _ => {
                return Err(Error::Config(
                    "a client certificate needs both its certificate and its key file".into(),
                ));
            }
        }
        if let Some(name) = &sec.server_name {
            tls = tls.domain_name(name.clone());
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| Error::Transport { context: "client TLS configuration".into(), source: e })?;
    }
    Ok(ep)
}

/// A client over `channel` with the token and message limits.
pub fn client(channel: Channel, sec: &ClientSecurity, max_message: usize) -> Result<Client, Error> {
    let bearer = Bearer::new(sec.token.as_deref())?;
    Ok(CoordinatorServiceClient::with_interceptor(Resend::new(channel), bearer)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message))
}

/// Connects now (errors name the address).
pub async fn connect(url: &str, sec: &ClientSecurity, max_message: usize) -> Result<Client, Error> {
    let channel = endpoint(url, sec)?.connect().await.map_err(|e| Error::Transport {
        context: format!("cannot reach the coordinator at {url}"),
        source: e,
    })?;
    client(channel, sec, max_message)
}

/// Connects on first use (the worker reconnects by itself).
pub fn connect_lazy(url: &str, sec: &ClientSecurity, max_message: usize) -> Result<Client, Error> {
    client(endpoint(url, sec)?.connect_lazy(), sec, max_message)
}

/// Installs ring as the process's rustls crypto provider. Call once at start-up, before any
/// TLS config is built (a second call is harmless).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
