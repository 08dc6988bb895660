//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status OpenAI uses for the same case.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    /// A bad request (400) about the field `param`.
    pub fn invalid(param: Option<&str>, message: String) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            message,
        }
    }

    /// The request names another model (404, as OpenAI answers).
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            message: format!("The model `{model}` does not exist: see GET /v1/models"),
        }
    }

    /// Too many requests wait already (503).
    pub fn overloaded(waiting: usize, max_queue: usize) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_overloaded",
            param: None,
            code: Some("queue_full"),
            message: format!(
                "the server is overloaded: {waiting} sequences already wait for a batch row \
                 (--max-queue {max_queue}); retry later"
            ),
        }
    }

    /// The request ran out of time (504).
    pub fn timeout(seconds: f64) -> Self {
        ApiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            kind: "timeout",
            param: None,
            code: Some("request_timeout"),
            message: format!("the request did not finish within {seconds} s (--request-timeout)"),
        }
    }

    /// Generation failed inside the server (500).
    pub fn internal(message: String) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            param: None,
            code: None,
            message,
        }
    }

    /// The body of the error.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
