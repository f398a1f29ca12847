//! The client side of the contract, shared by real workers, the CLI and the
//! simulated workers of the coordinator's tests: a list of coordinator
//! endpoints that follows the leader, bearer tokens, TLS.
//!
//! A call that fails because the endpoint is down (transport error) or is a
//! standby (`UNAVAILABLE`) moves on to the next endpoint and is retried
//! with a doubling pause, until a deadline. Any other answer is about the
//! request itself and is returned as is.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Code, Status};

/// Endpoint rotation with failover.
#[derive(Debug, Clone)]
pub struct Endpoints {
    list: Vec<String>,
    current: usize,
    channel: Option<Channel>,
    /// Sent as `authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// TLS for `https://` endpoints.
    pub tls: Option<ClientTlsConfig>,
    /// How long one call keeps failing over before giving up.
    pub deadline: Duration,
    /// The longest pause between two tries.
    pub max_pause: Duration,
}

impl Endpoints {
    /// `list` must not be empty.
    pub fn new(list: Vec<String>) -> Self {
        assert!(!list.is_empty(), "at least one endpoint");
        Self {
            list,
            current: 0,
            channel: None,
            token: None,
            tls: None,
            deadline: Duration::from_secs(60),
            max_pause: Duration::from_millis(200),
        }
    }

    /// The endpoint calls go to now.
    pub fn current(&self) -> &str {
        &self.list[self.current]
    }

    async fn channel(&mut self) -> Option<Channel> {
        if self.channel.is_none() {
            let ep = tonic::transport::Endpoint::from_shared(self.list[self.current].clone())
                .ok()?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10));
            let ep = match &self.tls {
                Some(tls) => ep.tls_config(tls.clone()).ok()?,
                None => ep,
            };
            // On failure the caller moves on to the next endpoint.
            self.channel = Some(ep.connect().await.ok()?);
        }
        self.channel.clone()
    }

    fn next(&mut self) {
        self.channel = None;
        self.current = (self.current + 1) % self.list.len();
    }

    /// Calls `f` on a channel to the current endpoint, failing over on
    /// errors that mean "not here" (down, or a standby).
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Channel, Option<String>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.deadline;
        let mut pause = Duration::from_millis(10);
        loop {
            let result = match self.channel().await {
                Some(ch) => f(ch, self.token.clone())
                    .await
                    .map(tonic::Response::into_inner),
                None => Err(Status::unavailable(format!(
                    "cannot connect to {}",
                    self.current()
                ))),
            };
            match result {
                Err(s) if failover(&s) && Instant::now() < deadline => {
                    self.next();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(self.max_pause);
                }
                other => return other,
            }
        }
    }
}

/// Whether an error means "try another endpoint": anything but an answer
/// about the request itself. A connection cut mid-call (a coordinator
/// killed) surfaces as `UNKNOWN`, `INTERNAL` or `CANCELLED` depending on
/// where the stream broke.
pub fn failover(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

/// `msg` with `authorization: Bearer <token>` when a token is given.
pub fn authed<T>(msg: T, token: Option<String>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
        req.metadata_mut().insert("authorization", t);
    }
    req
}
