//! Request bodies under a deadline and a minimum rate, for every route and every caller
//! (authenticated ones included): a body must arrive within the request timeout counted
//! from the end of its headers, and, after its first second, on average at
//! `min_body_rate` bytes/s at least. A body that misses either fails its read with
//! [`BodyStalled`], which [`super::body`] answers 408 `request_timeout` (closing the
//! connection), so a slow sender holds its connection for a bounded time only. A request
//! without a body is passed through as it is.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::AppState;

/// Time a body gets before the rate check starts: a client's first packet may lag.
const RATE_GRACE: Duration = Duration::from_secs(1);

/// The limits every request body is read under.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Time for the whole body, from the end of the headers.
    pub deadline: Duration,
    /// Least average rate in bytes/s after the first second; 0 means no rate check.
    pub min_rate: u64,
}

/// Why a body read was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyStalled {
    /// The whole-body deadline passed.
    #[error("the request body did not arrive within {0} s")]
    Deadline(u64),
    /// The body came in slower than the minimum rate.
    #[error("the request body arrived slower than {0} bytes/s")]
    TooSlow(u64),
}

/// A body that fails with [`BodyStalled`] when it falls behind its limits.
struct Guarded {
    inner: Body,
    limits: BodyLimits,
    start: Instant,
    received: u64,
    timer: Pin<Box<Sleep>>,
}

impl Guarded {
    fn new(inner: Body, limits: BodyLimits) -> Guarded {
        let start = Instant::now();
        let mut g = Guarded {
            inner,
            limits,
            start,
            received: 0,
            timer: Box::pin(tokio::time::sleep_until(start + limits.deadline)),
        };
        g.rearm();
        g
    }

    fn deadline(&self) -> Instant {
        self.start + self.limits.deadline
    }

    /// When the body falls behind the rate unless another byte arrives.
    fn rate_deadline(&self) -> Option<Instant> {
        let rate = self.limits.min_rate;
        (rate > 0).then(|| {
            let need = Duration::from_secs_f64((self.received + 1) as f64 / rate as f64);
            self.start + RATE_GRACE + need
        })
    }

    fn rearm(&mut self) {
        let at = match self.rate_deadline() {
            Some(r) => r.min(self.deadline()),
            None => self.deadline(),
        };
        self.timer.as_mut().reset(at);
    }

    fn stalled(&self) -> BodyStalled {
        if Instant::now() >= self.deadline() {
            BodyStalled::Deadline(self.limits.deadline.as_secs())
        } else {
            BodyStalled::TooSlow(self.limits.min_rate)
        }
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    this.rearm();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(this.stalled())))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The middleware: puts every request's body under the configured limits.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // A request without a body (most GETs) has nothing to guard: no timer for it.
    if http_body::Body::is_end_stream(req.body()) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let body = Body::new(Guarded::new(body, state.body_limits));
    next.run(Request::from_parts(parts, body)).await
}
