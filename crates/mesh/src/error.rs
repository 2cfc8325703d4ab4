//! One typed error for a call to another service that did not produce an
//! answer (pingora's `Error` is the model): which service, what kind of
//! failure, whether trying again is safe, and the cause for the log.
//! [`CallError::status`] and [`CallError::detail`] are the one mapping to
//! what a client is told; the cause never is.

use std::fmt;

/// A boxed cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No instance of the service is registered or fit to serve (or the
    /// registry cannot be read).
    NoInstance,
    /// No connection could be made: nothing was sent.
    Connect,
    /// No answer within the call's timeout.
    Timeout,
    /// Every instance's breaker is open: failing fast.
    BreakerOpen,
    /// The caller already has as many calls in flight to the service as
    /// its bulkhead allows.
    BulkheadFull,
    /// The connection broke mid-call, or the answer was malformed or too
    /// large.
    BadAnswer,
    /// The caller asked for something that cannot be sent (a `..` path
    /// segment, a body that cannot be encoded): nothing was sent.
    InvalidRequest,
}

impl ErrorKind {
    /// Every kind, in the order of [`ErrorKind::index`].
    pub const ALL: [Self; 7] = [
        Self::NoInstance,
        Self::Connect,
        Self::Timeout,
        Self::BreakerOpen,
        Self::BulkheadFull,
        Self::BadAnswer,
        Self::InvalidRequest,
    ];

    /// The metric label of the outcome.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoInstance => "no_instance",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::BreakerOpen => "breaker_open",
            Self::BulkheadFull => "bulkhead_full",
            Self::BadAnswer => "bad_answer",
            Self::InvalidRequest => "invalid_request",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A call that failed, with where and why.
#[derive(Debug)]
pub struct CallError {
    /// The service called.
    pub service: String,
    pub kind: ErrorKind,
    /// Whether sending the same request again cannot do harm: nothing
    /// reached the service, or the request is idempotent.
    pub retry_safe: bool,
    cause: Option<BoxError>,
}

impl CallError {
    pub fn new(service: &str, kind: ErrorKind, retry_safe: bool) -> Self {
        Self {
            service: service.to_owned(),
            kind,
            retry_safe,
            cause: None,
        }
    }

    #[must_use]
    pub fn because(mut self, cause: impl Into<BoxError>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    /// The HTTP status a caller answers with: 503 when the service cannot
    /// be reached or is shielded, 504 on a timeout, 502 on a bad answer,
    /// 400 for a request that cannot be sent.
    pub fn status(&self) -> u16 {
        match self.kind {
            ErrorKind::NoInstance
            | ErrorKind::Connect
            | ErrorKind::BreakerOpen
            | ErrorKind::BulkheadFull => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::BadAnswer => 502,
            ErrorKind::InvalidRequest => 400,
        }
    }

    /// A stable sentence for a client: the service's name and the kind,
    /// never an address or a library's message.
    pub fn detail(&self) -> String {
        let s = &self.service;
        match self.kind {
            ErrorKind::NoInstance => format!("{s} is unavailable"),
            ErrorKind::Connect => format!("{s} is unreachable"),
            ErrorKind::Timeout => format!("{s} did not answer in time"),
            ErrorKind::BreakerOpen => format!("{s} is unavailable (circuit open)"),
            ErrorKind::BulkheadFull => format!("{s} is busy; try again"),
            ErrorKind::BadAnswer => format!("{s} failed to answer"),
            ErrorKind::InvalidRequest => format!("the request cannot be sent to {s}"),
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "call to {} failed: {}", self.service, self.kind.label())?;
        if let Some(cause) = &self.cause {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// How one attempt failed, as its transport reports it.
#[derive(Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub cause: BoxError,
}

impl Failure {
    /// No connection: nothing was sent, so another instance may be tried
    /// whatever the method.
    pub fn connect(cause: impl Into<BoxError>) -> Self {
        Self {
            kind: ErrorKind::Connect,
            cause: cause.into(),
        }
    }

    /// The request may have reached the service: only an idempotent one
    /// is sent again.
    pub fn bad_answer(cause: impl Into<BoxError>) -> Self {
        Self {
            kind: ErrorKind::BadAnswer,
            cause: cause.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_details_name_the_service_not_the_cause() {
        let e = CallError::new("orders", ErrorKind::BreakerOpen, true)
            .because("connect 127.0.0.1:4567 refused");
        assert_eq!(e.status(), 503);
        assert!(!e.detail().contains("127.0.0.1"));
        assert!(
            e.to_string().contains("127.0.0.1"),
            "the log keeps the cause"
        );
        assert_eq!(
            CallError::new("orders", ErrorKind::Timeout, false).status(),
            504
        );
        assert_eq!(
            CallError::new("orders", ErrorKind::BadAnswer, false).status(),
            502
        );
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }
}
