//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status
//! a client expects. Internal failures are logged and answered with a generic message.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// 400 not tied to one field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401.
    pub fn unauthorized() -> Self {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid or missing API key")
        }
    }

    /// 404 for a model this server does not serve.
    pub fn unknown_model(model: &str, served: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                format!("the model `{model}` does not exist; this server serves `{served}`"),
            )
        }
    }

    /// 404 for a route.
    pub fn no_route(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("no route for {path}"))
    }

    /// 405 with the methods the route takes.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        ApiError {
            code: Some("method_not_allowed"),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} does not take {method}"),
            )
        }
    }

    /// 408 when the body did not arrive in time.
    pub fn body_timeout(secs: u64) -> Self {
        ApiError {
            code: Some("request_timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {secs} s"),
            )
        }
    }

    /// 415 for a body that is not declared as JSON.
    pub fn not_json(content_type: Option<&str>) -> Self {
        ApiError {
            code: Some("unsupported_media_type"),
            ..Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "the request body must be sent as `Content-Type: application/json`, not {}",
                    content_type.map_or("without a Content-Type".to_string(), |c| format!("`{c}`"))
                ),
            )
        }
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {limit} bytes"),
            )
        }
    }

    /// 429 with `Retry-After`.
    pub fn busy(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("queue_full"),
            retry_after: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }

    /// 503 while loading or draining.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    /// 504 when a request runs past its time limit.
    pub fn timeout(secs: u64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the request ran longer than the server's limit of {secs} s"),
        )
    }

    /// 500: logs `detail`, answers a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {detail}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal server error; see the server log",
        )
    }

    /// OpenAI's `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 405 | 408 | 413 | 415 => "invalid_request_error",
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            504 => "timeout_error",
            _ => "internal_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        use crate::Error as E;
        match e {
            E::PromptTooLong {
                prompt_tokens,
                max_model_len,
            } => ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    "messages",
                    format!(
                        "this model's maximum context length is {max_model_len} tokens, but the \
                         prompt has {prompt_tokens} tokens (at least one token must be left for \
                         the reply)"
                    ),
                )
            },
            E::InvalidRequest(m) => ApiError::bad_request(m),
            E::InvalidParam { param, message } => ApiError::invalid(param, message),
            E::Template(m) => ApiError::invalid("messages", format!("chat template: {m}")),
            E::Tokenizer(m) => ApiError::bad_request(format!("tokenizer: {m}")),
            E::Overloaded { waiting } => ApiError::busy(format!(
                "the server is busy ({waiting} requests waiting); retry later"
            )),
            E::ShuttingDown => ApiError::unavailable("the server is shutting down"),
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
