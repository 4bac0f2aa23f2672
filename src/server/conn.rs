//! Connections: the accept loop, with a time or size limit on everything a client controls.
//!
//! axum's own `serve` has no header, idle or write-stall timeouts and no connection cap, so a
//! client that trickles header bytes, leaves a keep-alive socket open or stops reading a
//! reply would hold its connection (and, for a reply, its KV blocks) for ever. This loop
//! serves each connection with hyper's HTTP/1 server directly and adds:
//!
//! | limit | default | what happens |
//! |---|---|---|
//! | `max_connections` | 512 | a connection past the cap gets `503` and is closed |
//! | `header_timeout` | 10 s | headers not complete in time: the connection is closed |
//! | `body_timeout` | 30 s | body not complete in time: `408` (in the guard middleware) |
//! | `idle_timeout` | 60 s | no request and no traffic, or a reply the client has not read for this long: the connection is closed, which cancels its request and frees its KV blocks |
//! | `shutdown_timeout` | 30 s | after SIGTERM, requests in flight get this long, then every connection is closed |
//!
//! A watchdog per connection sees the socket through `Watched`, which stamps every read
//! and write that makes progress and notes when a write has been waiting on the client.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// Limits on connections; see the module doc for what each does.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most open connections.
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// Longest a client may take to send a request's body.
    pub body_timeout: Duration,
    /// Longest a connection may sit without a request, or with a reply the client does not
    /// read.
    pub idle_timeout: Duration,
    /// Longest draining may take after a shutdown signal.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Send buffer per connection: a few round trips of a fast stream, far more than a reply
/// waiting on a slow client needs.
const SEND_BUFFER: usize = 64 << 10;

/// What the watchdog knows about one connection. Times are milliseconds since `epoch`.
struct Activity {
    epoch: Instant,
    /// Last read or write that moved bytes.
    last_io: AtomicU64,
    /// When a write started waiting on the client (0: none waiting). Stored +1 so that a
    /// wait starting at 0 ms still counts.
    write_blocked_since: AtomicU64,
    /// Requests being answered (from the call until the reply's body ends or is dropped).
    active: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_io: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn progressed(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    /// Why the connection should be closed now, if it should (`closing`: the server is
    /// stopping, so a connection without a request goes at once).
    fn verdict(&self, idle: Duration, closing: bool) -> Option<&'static str> {
        let now = self.now();
        let idle = idle.as_millis() as u64;
        let blocked = self.write_blocked_since.load(Ordering::Relaxed);
        if blocked != 0 && now.saturating_sub(blocked - 1) > idle {
            return Some("the client has not read its reply");
        }
        let quiet = now.saturating_sub(self.last_io.load(Ordering::Relaxed));
        if self.active.load(Ordering::Relaxed) == 0 && (closing || quiet > idle) {
            return Some("idle");
        }
        None
    }
}

/// A socket whose progress the watchdog can see.
struct Watched<T> {
    inner: T,
    act: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.act.progressed();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> Watched<T> {
    fn track<R>(&self, r: &Poll<std::io::Result<R>>) {
        match r {
            Poll::Pending => {
                let _ = self.act.write_blocked_since.compare_exchange(
                    0,
                    self.act.now() + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            Poll::Ready(_) => {
                self.act.write_blocked_since.store(0, Ordering::Relaxed);
                self.act.progressed();
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.track(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.track(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.track(&r);
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request as active until the reply's body ends or is dropped.
struct ActiveGuard(Arc<Activity>);

impl ActiveGuard {
    fn new(act: &Arc<Activity>) -> Self {
        act.active.fetch_add(1, Ordering::Relaxed);
        act.progressed();
        ActiveGuard(act.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.progressed();
    }
}

/// A reply body that holds its request's [`ActiveGuard`].
struct Guarded {
    body: Body,
    _guard: ActiveGuard,
}

impl hyper::body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves one connection until it ends, the watchdog closes it, or the task is aborted.
async fn connection(socket: TcpStream, app: Router, limits: Limits, closing: Arc<AtomicBool>) {
    let _ = socket.set_nodelay(true);
    // A bounded send buffer (the kernel would grow it to megabytes): a client that stops
    // reading backs the writes up within a few hundred events, so the watchdog sees it.
    let _ = socket2::SockRef::from(&socket).set_send_buffer_size(SEND_BUFFER);
    let act = Activity::new();
    let io = TokioIo::new(Watched {
        inner: socket,
        act: act.clone(),
    });
    let svc_act = act.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = ActiveGuard::new(&svc_act);
        let app = app.clone();
        async move {
            let resp = app
                .oneshot(req.map(Body::new))
                .await
                .unwrap_or_else(|never| match never {});
            Ok::<_, std::convert::Infallible>(resp.map(|body| Guarded {
                body,
                _guard: guard,
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(io, svc);
    let tick =
        (limits.idle_timeout / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
    let watchdog = async {
        loop {
            tokio::time::sleep(tick).await;
            if let Some(why) = act.verdict(limits.idle_timeout, closing.load(Ordering::Relaxed)) {
                return why;
            }
        }
    };
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                tracing::debug!("connection ended: {e}");
            }
        }
        why = watchdog => tracing::debug!("closing a connection: {why}"),
    }
}

/// Answers a connection past the cap with 503 and closes it.
async fn refuse(mut socket: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"error":{"message":"too many open connections; retry later","type":"service_unavailable_error","param":null,"code":null}}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        socket.write_all(head.as_bytes()).await?;
        socket.write_all(body.as_bytes()).await?;
        socket.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Accepts connections on `listener` and serves `app` on them until `stop` resolves; then
/// stops accepting, gives the open connections up to `grace` to finish, and closes the rest.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let closing = Arc::new(AtomicBool::new(false));
    let mut conns = JoinSet::new();
    let mut refusals = JoinSet::new();
    tokio::pin!(stop);
    loop {
        while conns.try_join_next().is_some() {}
        while refusals.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => break,
        };
        let socket = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let (app, closing) = (app.clone(), closing.clone());
                conns.spawn(async move {
                    connection(socket, app, limits, closing).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tracing::warn!("refusing a connection: {} are open", limits.max_connections);
                refusals.spawn(refuse(socket));
            }
        }
    }
    drop(listener);
    // Connections without a request in flight close at their next check; the rest get
    // `grace`, then are closed (which cancels their requests).
    closing.store(true, Ordering::Relaxed);
    let all_done = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(grace, all_done).await;
    conns.shutdown().await;
    refusals.shutdown().await;
}
