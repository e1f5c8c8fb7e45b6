//! Request bodies under a deadline and a minimum rate, for every route and every caller
//! (authenticated ones included): a body must arrive within the request timeout counted
//! from the end of its headers, and, after its first second, on average at
//! `min_body_rate` bytes/s at least. A body that misses either fails its read with
//! [`BodyStalled`], which [`super::body`] answers 408 `request_timeout` (closing the
//! connection), so a slow sender holds its connection for a bounded time only. A request
//! without a body is passed through as it is.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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
    /// Armed the first time the body has to wait: most bodies come with their headers and
    /// never need one, and a timer's first registration on a connection's runtime, which
    /// has no other, wakes that runtime's driver (a system call and a wasted poll).
    timer: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    fn new(inner: Body, limits: BodyLimits) -> Guarded {
        Guarded {
            inner,
            limits,
            start: Instant::now(),
            received: 0,
            timer: None,
        }
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

    /// When the body is cut off unless more of it arrives.
    fn due(&self) -> Instant {
        match self.rate_deadline() {
            Some(r) => r.min(self.deadline()),
            None => self.deadline(),
        }
    }

    fn rearm(&mut self) {
        let due = self.due();
        if let Some(timer) = self.timer.as_mut() {
            timer.as_mut().reset(due);
        }
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
            Poll::Pending => {
                let due = this.due();
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(this.stalled())))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that, dropped before its end (a handler that refused the request without
/// reading it), leaves what is left of it in `slot` for [`layer`] to read.
struct Leftover {
    inner: Option<Body>,
    done: bool,
    slot: Arc<Mutex<Option<Body>>>,
}

impl http_body::Body for Leftover {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.done = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(http_body::Body::size_hint)
            .unwrap_or_default()
    }
}

impl Drop for Leftover {
    fn drop(&mut self) {
        if let Some(body) = self.inner.take() {
            if !self.done && !http_body::Body::is_end_stream(&body) {
                *crate::sync::lock(&self.slot) = Some(body);
            }
        }
    }
}

/// The middleware: puts every request's body under the configured limits. A body its
/// handler did not read to the end (a refusal answered before the body was needed) is read
/// here, still under those limits and at most [`super::body::MAX_BODY`] bytes, before the
/// answer goes out: a connection closed with unread bytes is reset, and over TCP the reset
/// can destroy the answer before the client reads it.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // A request without a body (most GETs) has nothing to guard: no timer for it.
    if http_body::Body::is_end_stream(req.body()) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let body = Body::new(Guarded::new(body, state.body_limits));
    reading_leftover(Request::from_parts(parts, body), |r| next.run(r)).await
}

/// Runs `handle` on `req`, then reads what it left of the body (see [`layer`]).
async fn reading_leftover<F, Fut>(req: Request, handle: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let (parts, body) = req.into_parts();
    let slot = Arc::new(Mutex::new(None));
    let body = Body::new(Leftover {
        inner: Some(body),
        done: false,
        slot: slot.clone(),
    });
    let response = handle(Request::from_parts(parts, body)).await;
    let unread = crate::sync::lock(&slot).take();
    if let Some(unread) = unread {
        let _ = axum::body::to_bytes(unread, super::body::MAX_BODY).await;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A body of `left` one-byte chunks that counts the chunks read from it.
    struct Counted {
        left: usize,
        read: Arc<AtomicUsize>,
    }

    impl http_body::Body for Counted {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            let _ = self.read.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    /// A body that yields `chunks` one-byte chunks, then never another.
    struct Stuck {
        chunks: usize,
    }

    impl http_body::Body for Stuck {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.chunks == 0 {
                return Poll::Pending;
            }
            self.chunks -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    /// Reads a body that stops after two bytes under `limits`: the message of the error
    /// that cut it off, and how long that took.
    async fn cut_off(limits: BodyLimits) -> (String, Duration) {
        let start = Instant::now();
        let body = Body::new(Guarded::new(Body::new(Stuck { chunks: 2 }), limits));
        let read = axum::body::to_bytes(body, 100).await;
        (read.unwrap_err().to_string(), start.elapsed())
    }

    #[tokio::test]
    async fn a_body_that_came_whole_arms_no_timer() {
        let read = Arc::new(AtomicUsize::new(0));
        let body = Body::new(Counted {
            left: 5,
            read: read.clone(),
        });
        let limits = BodyLimits {
            deadline: Duration::from_secs(30),
            min_rate: 100,
        };
        let mut g = Guarded::new(body, limits);
        let mut got = 0;
        while let Some(frame) =
            std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut g), cx)).await
        {
            got += frame.unwrap().into_data().unwrap().len();
        }
        assert_eq!(got, 5);
        assert!(
            g.timer.is_none(),
            "a timer was armed for a body that never waited"
        );
    }

    #[tokio::test]
    async fn a_body_that_stops_coming_is_cut_at_the_deadline() {
        let limits = BodyLimits {
            deadline: Duration::from_secs(1),
            min_rate: 0,
        };
        let (err, took) = cut_off(limits).await;
        assert!(err.contains("within 1 s"), "{err}");
        assert!(took >= Duration::from_secs(1), "cut after {took:?}");
        assert!(took < Duration::from_secs(10), "cut after {took:?}");
    }

    #[tokio::test]
    async fn a_body_that_falls_behind_the_minimum_rate_is_cut_before_the_deadline() {
        let limits = BodyLimits {
            deadline: Duration::from_secs(60),
            min_rate: 10,
        };
        let (err, took) = cut_off(limits).await;
        assert!(err.contains("slower than 10 bytes/s"), "{err}");
        // The grace second, then 3 bytes' worth at 10 bytes/s: 1.3 s.
        assert!(took >= Duration::from_millis(1300), "cut after {took:?}");
        assert!(took < Duration::from_secs(30), "cut after {took:?}");
    }

    fn request(read: &Arc<AtomicUsize>) -> Request {
        let body = Counted {
            left: 5,
            read: read.clone(),
        };
        Request::new(Body::new(body))
    }

    #[tokio::test]
    async fn a_body_its_handler_refused_unread_is_read_before_the_answer() {
        let read = Arc::new(AtomicUsize::new(0));
        let answer = reading_leftover(request(&read), |req| async move {
            drop(req);
            Response::new(Body::from("refused"))
        })
        .await;
        assert_eq!(read.load(Ordering::SeqCst), 5, "the whole body was read");
        let text = axum::body::to_bytes(answer.into_body(), 100).await.unwrap();
        assert_eq!(&text[..], b"refused");
    }

    #[tokio::test]
    async fn a_body_its_handler_read_is_not_read_again() {
        let read = Arc::new(AtomicUsize::new(0));
        let _ = reading_leftover(request(&read), |req| async move {
            let got = axum::body::to_bytes(req.into_body(), 100).await.unwrap();
            assert_eq!(got.len(), 5);
            Response::new(Body::empty())
        })
        .await;
        assert_eq!(read.load(Ordering::SeqCst), 5);
    }
}
