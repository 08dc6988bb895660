//! The HTTP routes: the playground page, `/health`, `/v1/models`, and the two completion
//! endpoints, answered whole or streamed as server-sent events.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::engine::{EngineHandle, Event, Finish, Job};
use super::error::ApiError;
use super::request::{self, Generation, RequestBody};
use super::text::ChoiceText;
use super::ServedModel;

/// The playground: plain HTML and JavaScript, shipped in the binary.
const PLAYGROUND: &str = include_str!("playground.html");

/// What the handlers share.
pub struct AppState {
    pub served: ServedModel,
    pub engine: EngineHandle,
    pub timeout: Duration,
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PLAYGROUND) }))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .with_state(state)
}

async fn health(State(state): State<Shared>) -> Json<Value> {
    let (steps, rows) = state.engine.steps_and_rows();
    Json(json!({
        "status": "ok",
        "running": state.engine.running(),
        "waiting": state.engine.waiting(),
        "decode_steps": steps,
        "decoded_rows": rows,
    }))
}

async fn models(State(state): State<Shared>) -> Json<Value> {
    let s = &state.served;
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.name,
            "object": "model",
            "created": s.created,
            "owned_by": "modpo",
            "preference_dimensions": s.dimensions,
            "default_preference_weights": s.default_weights,
            "max_batch": s.max_batch,
            "context_length": s.context_length,
        }],
    }))
}

/// Which endpoint a response is for: the shapes differ in names and where the text goes.
#[derive(Clone, Copy)]
enum Flavor {
    Chat,
    Completion,
}

impl Flavor {
    fn id_prefix(self) -> &'static str {
        match self {
            Flavor::Chat => "chatcmpl",
            Flavor::Completion => "cmpl",
        }
    }

    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Flavor::Chat, false) => "chat.completion",
            (Flavor::Chat, true) => "chat.completion.chunk",
            (Flavor::Completion, _) => "text_completion",
        }
    }

    /// A whole choice.
    fn choice(self, index: usize, text: &str, finish: Option<&str>) -> Value {
        match self {
            Flavor::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Flavor::Completion => json!({
                "index": index, "text": text, "logprobs": null, "finish_reason": finish,
            }),
        }
    }

    /// A streamed piece of a choice (`first`: the chat delta also carries the role).
    fn delta(self, index: usize, text: &str, first: bool, finish: Option<&str>) -> Value {
        match self {
            Flavor::Chat => {
                let delta = match (first, finish) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, Some(_)) if text.is_empty() => json!({}),
                    _ => json!({"content": text}),
                };
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Flavor::Completion => self.choice(index, text, finish),
        }
    }
}

async fn chat(State(state): State<Shared>, body: Bytes) -> Response {
    let generation = request::parse_body::<RequestBody>(&body).and_then(|r| {
        request::check_model(&state.served, &r)?;
        let prompt = request::chat_prompt(&state.served, &r)?;
        request::check(&state.served, r, prompt, "messages")
    });
    respond(state, generation, Flavor::Chat).await
}

async fn completions(State(state): State<Shared>, body: Bytes) -> Response {
    let generation = request::parse_body::<RequestBody>(&body).and_then(|r| {
        request::check_model(&state.served, &r)?;
        let prompt = request::completion_prompt(&state.served, &r)?;
        request::check(&state.served, r, prompt, "prompt")
    });
    respond(state, generation, Flavor::Completion).await
}

/// Queues the request's choices and answers whole or as a stream.
async fn respond(
    state: Shared,
    generation: Result<Generation, ApiError>,
    flavor: Flavor,
) -> Response {
    let generation = match generation {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let (sender, events) = mpsc::unbounded_channel();
    let weights: Vec<f32> = generation.weights.iter().map(|&w| w as f32).collect();
    // Choice i samples with seed + i, so n sampled choices differ (greedy ones do not).
    let jobs = (0..generation.n)
        .map(|choice| {
            let mut options = generation.options.clone();
            options.seed = options.seed.wrapping_add(choice as u64);
            Job {
                prompt: generation.prompt.clone(),
                weights: weights.clone(),
                options,
                choice,
                events: sender.clone(),
            }
        })
        .collect();
    drop(sender);
    if let Err(full) = state.engine.submit(jobs) {
        return ApiError::overloaded(full.waiting, full.max_queue).into_response();
    }
    let answer = Answer {
        id: format!("{}-{}", flavor.id_prefix(), unique_id()),
        created: unix_time(),
        flavor,
        texts: (0..generation.n)
            .map(|_| ChoiceText::new(&generation.stops))
            .collect(),
        finishes: vec![None; generation.n],
        deadline: Instant::now() + state.timeout,
        events,
        generation,
        state,
    };
    if answer.generation.stream {
        stream(answer).into_response()
    } else {
        answer.whole().await.into_response()
    }
}

/// A request being answered: its choices' texts as the engine's tokens arrive.
struct Answer {
    id: String,
    created: u64,
    flavor: Flavor,
    generation: Generation,
    texts: Vec<ChoiceText>,
    finishes: Vec<Option<&'static str>>,
    deadline: Instant,
    events: UnboundedReceiver<(usize, Event)>,
    state: Shared,
}

/// A new piece of one choice: its text and, when it ended, why.
struct Piece {
    choice: usize,
    text: String,
    finish: Option<&'static str>,
}

impl Answer {
    fn finished(&self) -> bool {
        self.finishes.iter().all(Option::is_some)
    }

    /// The next piece of text from the engine, or the error that ends the request.
    async fn next_piece(&mut self) -> Result<Piece, ApiError> {
        let timeout = self.state.timeout.as_secs_f64();
        let event = tokio::time::timeout_at(self.deadline, self.events.recv())
            .await
            .map_err(|_| ApiError::timeout(timeout))?
            .ok_or_else(|| ApiError::internal("the decoding engine stopped".into()))?;
        let tokenizer = &self.state.served.tokenizer;
        let (choice, event) = event;
        let internal = |e: anyhow::Error| ApiError::internal(format!("{e:#}"));
        let text = &mut self.texts[choice];
        let (piece, finish) = match event {
            Event::Token(token) => {
                let piece = text.push(token, tokenizer).map_err(internal)?;
                (piece, text.stopped().then_some("stop"))
            }
            Event::Finished(finish) => {
                let piece = text.finish(tokenizer).map_err(internal)?;
                let reason = match finish {
                    Finish::EndOfSequence => "stop",
                    Finish::Length => "length",
                };
                (piece, Some(reason))
            }
            Event::Failed(message) => return Err(ApiError::internal(message)),
        };
        // A choice ended by a stop string ignores the engine's later events for it. (With n > 1
        // its sequence decodes on until the request ends: the choices share one channel, and
        // dropping it is what cancels them.)
        let finish = match self.finishes[choice] {
            Some(_) => {
                return Ok(Piece {
                    choice,
                    text: String::new(),
                    finish: None,
                })
            }
            None => finish,
        };
        self.finishes[choice] = finish;
        Ok(Piece {
            choice,
            text: piece,
            finish,
        })
    }

    fn usage(&self) -> Value {
        let prompt = self.generation.prompt.len();
        let completion: usize = self.texts.iter().map(ChoiceText::token_count).sum();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        })
    }

    /// The response's fields around `choices`.
    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.flavor.object(chunk),
            "created": self.created,
            "model": self.state.served.name,
            "system_fingerprint": null,
            "choices": choices,
            "preference_weights": self.generation.weights,
        })
    }

    /// Waits for every choice and answers with the whole response.
    async fn whole(mut self) -> Result<Json<Value>, ApiError> {
        let mut contents = vec![String::new(); self.generation.n];
        while !self.finished() {
            let piece = self.next_piece().await?;
            contents[piece.choice].push_str(&piece.text);
        }
        let choices = contents
            .iter()
            .enumerate()
            .map(|(i, text)| self.flavor.choice(i, text, self.finishes[i]))
            .collect();
        let mut body = self.envelope(false, choices);
        body["usage"] = self.usage();
        Ok(Json(body))
    }
}

/// Streams the answer as server-sent events: a chunk per piece of text, the usage when asked
/// for, then `[DONE]`; an error ends the stream with an `error` event.
fn stream(mut answer: Answer) -> Sse<ReceiverStream<Result<SseEvent, Infallible>>> {
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        let data = |value: &Value| Ok(SseEvent::default().data(value.to_string()));
        let mut started = vec![false; answer.generation.n];
        while !answer.finished() {
            let piece = match answer.next_piece().await {
                Ok(piece) => piece,
                Err(e) => {
                    let _ = sender.send(data(&e.body())).await;
                    return;
                }
            };
            if piece.text.is_empty() && piece.finish.is_none() && started[piece.choice] {
                continue;
            }
            let first = !std::mem::replace(&mut started[piece.choice], true);
            let delta = answer
                .flavor
                .delta(piece.choice, &piece.text, first, piece.finish);
            let chunk = answer.envelope(true, vec![delta]);
            if sender.send(data(&chunk)).await.is_err() {
                return; // the client left; dropping `answer` cancels its sequences
            }
        }
        if answer.generation.include_usage {
            let mut chunk = answer.envelope(true, vec![]);
            chunk["usage"] = answer.usage();
            let _ = sender.send(data(&chunk)).await;
        }
        let _ = sender.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(receiver))
}

/// Seconds since the Unix epoch.
pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A response id unique within this server: the start time and a counter.
fn unique_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:x}{:04x}",
        unix_time(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
