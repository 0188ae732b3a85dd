//! HTTP to one repository of a registry (the OCI distribution API): TLS as
//! configured, authentication on demand, retries with backoff.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::config::{self, Challenge, Credentials};
use super::reference::Reference;
use super::PullProgress;

/// Bound on a token answer or an error body we read.
const MAX_SMALL_ANSWER: u64 = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A stalled read fails after this (and is retried, resuming).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(16);

/// How to reach a registry, and as whom.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `Some(false)`: plain HTTP allowed and certificates not checked
    /// (`--tls-verify=false`); `Some(true)`: verified HTTPS even where
    /// registries.conf says insecure; `None`: registries.conf decides.
    pub tls_verify: Option<bool>,
    pub registries_conf: std::path::PathBuf,
    /// Credential files, the first existing one used.
    pub auth_files: Vec<std::path::PathBuf>,
    /// The files were named by the user (`--authfile`): they must exist.
    pub auth_files_explicit: bool,
    /// Further attempts after a failed request (network errors, 429, 5xx).
    pub retries: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            tls_verify: None,
            registries_conf: config::default_registries_conf(),
            auth_files: config::default_auth_files(),
            auth_files_explicit: false,
            retries: 3,
        }
    }
}

/// A failed attempt: retried (with backoff) or not.
pub(crate) struct Failure {
    pub retry: bool,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn fatal(error: anyhow::Error) -> Self {
        Self {
            retry: false,
            error,
        }
    }
    pub fn transient(error: anyhow::Error) -> Self {
        Self { retry: true, error }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::fatal(error)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self::transient(e.into())
    }
}

pub struct Client {
    agent: ureq::Agent,
    /// `https://host[:port]` or, for an insecure registry that does not
    /// speak TLS, `http://…`.
    base: String,
    pub(crate) reference: Reference,
    credentials: Option<Credentials>,
    authorization: Mutex<Option<String>>,
    retries: u32,
}

impl Client {
    /// Reach the registry of `reference` (its `/v2/` endpoint) over HTTPS,
    /// or plain HTTP when it is insecure and has no TLS.
    pub fn connect(
        reference: &Reference,
        opts: &ClientOptions,
        progress: &dyn PullProgress,
    ) -> Result<Self> {
        let insecure = match opts.tls_verify {
            Some(v) => !v,
            None => config::insecure_in(&opts.registries_conf, reference)?,
        };
        let credentials =
            config::credentials(&opts.auth_files, opts.auth_files_explicit, reference)?;
        let agent = agent(insecure)?;
        let mut client = Self {
            agent,
            base: format!("https://{}", reference.registry),
            reference: reference.clone(),
            credentials,
            authorization: Mutex::new(None),
            retries: opts.retries,
        };
        let unreachable = || format!("cannot reach registry {}", reference.registry);
        if !insecure {
            client.ping(progress, true).with_context(unreachable)?;
            return Ok(client);
        }
        // An insecure registry may not speak TLS at all: HTTPS is tried
        // once, then plain HTTP (with retries), as podman does.
        if let Err(https) = client.ping(progress, false) {
            client.base = format!("http://{}", reference.registry);
            client.ping(progress, true).map_err(|plain| {
                anyhow!(
                    "{}: over plain HTTP: {plain:#}; over HTTPS: {https:#}",
                    unreachable()
                )
            })?;
        }
        Ok(client)
    }

    fn ping(&self, progress: &dyn PullProgress, retry: bool) -> Result<()> {
        let url = format!("{}/v2/", self.base);
        let attempt = || match self.agent.get(&url).call() {
            Ok(_) | Err(ureq::Error::Status(401, _)) => Ok(()),
            Err(ureq::Error::Status(404, _)) => Err(Failure::fatal(anyhow!(
                "{url} answered 404: not a registry of the OCI distribution API"
            ))),
            Err(e) => Err(classify(e, &url)),
        };
        if retry {
            self.with_retries(
                &format!("registry {}", self.reference.registry),
                progress,
                attempt,
            )
        } else {
            attempt().map_err(|f| f.error)
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Run `attempt` until it succeeds, fails for good, or the retries are
    /// spent; waits 1 s, 2 s, 4 s… (at most 16 s) between attempts.
    pub(crate) fn with_retries<T>(
        &self,
        what: &str,
        progress: &dyn PullProgress,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T> {
        let mut wait = Duration::from_secs(1);
        for n in 0.. {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(f) if f.retry && n < self.retries => {
                    progress.retrying(what, n + 2, wait, &f.error);
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
                Err(f) if f.retry => {
                    return Err(f.error.context(format!("gave up after {} attempts", n + 1)))
                }
                Err(f) => return Err(f.error),
            }
        }
        unreachable!("the loop returns")
    }

    /// GET `/v2/<repository>/<path>` with `headers`, authenticating once if
    /// the registry asks. A 401 after authenticating, 403 and 404 fail for
    /// good; network errors, 429 and 5xx may be retried.
    pub(crate) fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<ureq::Response, Failure> {
        let url = format!("{}/v2/{}/{path}", self.base, self.reference.repository);
        let mut authenticated = false;
        loop {
            let mut req = self.agent.get(&url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if let Some(a) = self.authorization.lock().unwrap().as_deref() {
                req = req.set("Authorization", a);
            }
            match req.call() {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(401, resp)) if !authenticated => {
                    let challenge = resp.header("WWW-Authenticate").map(str::to_string);
                    let challenge = challenge.ok_or_else(|| {
                        Failure::fatal(anyhow!(
                            "{url} answered 401 without a WWW-Authenticate challenge"
                        ))
                    })?;
                    self.authenticate(&config::parse_challenge(&challenge)?)?;
                    authenticated = true;
                }
                Err(ureq::Error::Status(401, _)) => {
                    return Err(Failure::fatal(anyhow!(
                        "registry {} refused the credentials for {} (401): log in again \
                         (podman login) or pass --authfile",
                        self.reference.registry,
                        self.reference.repository
                    )))
                }
                Err(e) => return Err(classify(e, &url)),
            }
        }
    }

    fn authenticate(&self, challenge: &Challenge) -> Result<(), Failure> {
        let registry = &self.reference.registry;
        let value = match challenge {
            Challenge::Basic => self
                .credentials
                .as_ref()
                .ok_or_else(|| Failure::fatal(no_credentials(registry)))?
                .basic(),
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => format!(
                "Bearer {}",
                self.token(realm, service.as_deref(), scope.as_deref())?
            ),
        };
        *self.authorization.lock().unwrap() = Some(value);
        Ok(())
    }

    /// A pull token from the registry's token service, anonymous or with
    /// the credentials of this registry.
    fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<String, Failure> {
        // Credentials go to the token service only over TLS, unless the
        // registry itself was declared insecure and the realm is its host.
        let over_tls = realm.starts_with("https://");
        let same_host = realm
            .strip_prefix("http://")
            .is_some_and(|r| r.split('/').next() == Some(self.reference.registry.as_str()));
        let insecure_self = self.base.starts_with("http://") && same_host;
        if !(over_tls || insecure_self) {
            return Err(Failure::fatal(anyhow!(
                "registry {} sends clients to the token service {realm:?}, which is neither HTTPS \
                 nor the insecure registry itself: refused",
                self.reference.registry
            )));
        }
        let default_scope = format!("repository:{}:pull", self.reference.repository);
        let mut url = format!(
            "{realm}{}scope={}",
            if realm.contains('?') { '&' } else { '?' },
            query_escape(scope.unwrap_or(&default_scope))
        );
        if let Some(s) = service {
            url.push_str(&format!("&service={}", query_escape(s)));
        }
        let mut req = self.agent.get(&url);
        if let Some(c) = &self.credentials {
            req = req.set("Authorization", &c.basic());
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code @ (401 | 403), _)) => {
                return Err(Failure::fatal(anyhow!(
                    "the token service of {} refused {} ({code}): check the credentials \
                     (podman login, --authfile)",
                    self.reference.registry,
                    if self.credentials.is_some() {
                        "the credentials"
                    } else {
                        "an anonymous pull"
                    }
                )))
            }
            Err(e) => return Err(classify(e, realm)),
        };
        let mut body = Vec::new();
        resp.into_reader()
            .take(MAX_SMALL_ANSWER + 1)
            .read_to_end(&mut body)?;
        if body.len() as u64 > MAX_SMALL_ANSWER {
            return Err(Failure::fatal(anyhow!(
                "the token answer from {realm} is over 1 MiB: refused"
            )));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| {
            Failure::fatal(anyhow!("the token answer from {realm} is not JSON: {e}"))
        })?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Failure::fatal(anyhow!("the token answer from {realm} carries no token"))
            })?;
        // It goes into a header: nothing that could split one.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Failure::fatal(anyhow!(
                "the token from {realm} is not printable ASCII: refused"
            )));
        }
        Ok(token)
    }
}

fn no_credentials(registry: &str) -> anyhow::Error {
    anyhow!(
        "registry {registry} needs credentials and none were found: log in (podman login \
         {registry}) or pass --authfile FILE"
    )
}

/// Which ureq errors are worth another attempt.
fn classify(e: ureq::Error, url: &str) -> Failure {
    match e {
        ureq::Error::Status(code, resp) => {
            let retry = code == 429 || code >= 500;
            let mut body = String::new();
            let _ = resp.into_reader().take(512).read_to_string(&mut body);
            let body = body.trim();
            let detail = if body.is_empty() {
                String::new()
            } else {
                format!(": {body}")
            };
            let what = match code {
                403 => "access denied",
                404 => "not found",
                429 => "too many requests",
                _ => "error",
            };
            Failure {
                retry,
                error: anyhow!("{url} answered {code} ({what}){detail}"),
            }
        }
        ureq::Error::Transport(t) => {
            // ureq's message names the URL. A TLS failure does not heal
            // by waiting: say what to do instead.
            let message = t.to_string();
            if message.contains("tls connection init failed") {
                let hint = if message.contains("corrupt message") {
                    "the registry does not speak TLS; if it is meant to be reached over plain \
                     HTTP, pass --tls-verify=false or mark it `insecure = true` in registries.conf"
                } else {
                    "its certificate is not trusted by this machine's CAs \
                     (/etc/ssl/certs, or SSL_CERT_FILE); --tls-verify=false skips the check"
                };
                Failure::fatal(anyhow!("{message} ({hint})"))
            } else {
                Failure::transient(anyhow!("{message}"))
            }
        }
    }
}

fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An HTTP agent: the system's CAs, or no certificate checks at all for an
/// insecure registry. Authorization headers are never carried across a
/// redirect (blob downloads are often redirected to other hosts).
fn agent(insecure: bool) -> Result<ureq::Agent> {
    let mut b = ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout_read(READ_TIMEOUT)
        .redirects(5)
        .redirect_auth_headers(ureq::RedirectAuthHeaders::Never)
        .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")));
    if insecure {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth();
        b = b.tls_config(Arc::new(tls));
    }
    Ok(b.build())
}

/// `--tls-verify=false`: any certificate is taken (the handshake's
/// signatures are still checked, so the session is at least with the
/// holder of the key it shows).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_escaped() {
        assert_eq!(
            super::query_escape("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
