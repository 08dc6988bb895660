//! `modpo-trainer serve`: the controllable model behind an OpenAI-compatible HTTP endpoint,
//! with the preference weights `w` chosen per request (`preference_weights`).
//!
//! - [`engine`]: continuous batching on one thread that owns the model; concurrent requests
//!   at different `w` decode together, one row (and KV cache) each.
//! - [`request`], [`error`]: the OpenAI request bodies, checked, and errors in OpenAI's shape.
//! - [`routes`]: axum handlers (whole answers and server-sent events), the playground page.
//! - [`text`]: a choice's text as its tokens arrive, with stop strings.
//!
//! The model knows nothing of HTTP: this module calls its API ([`CausalLm::forward_cached`],
//! [`CausalLm::decode_rows`]) and the run loader ([`crate::saved_run`]).

pub mod engine;
pub mod error;
pub mod request;
pub mod routes;
pub mod text;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::export::validate_weights;
use crate::model::{self, CausalLm, DeviceChoice, DtypeChoice};
use crate::saved_run;
use crate::tokenizer::ChatTokenizer;
use engine::{Engine, EngineModel};

/// `modpo-trainer serve`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// A run directory: its final adapters, conditioned per request on `preference_weights`.
    #[arg(long, conflicts_with = "model")]
    pub run: Option<PathBuf>,
    /// A Hugging Face model directory, served without adapters.
    #[arg(long, required_unless_present = "run")]
    pub model: Option<PathBuf>,
    /// The preference weights of a request that gives none, one per dimension, on the simplex
    /// (default: all dimensions weighted equally).
    #[arg(
        long,
        requires = "run",
        value_name = "W,..",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub weights: Vec<f64>,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed on start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name requests must give (default: the run's or model's directory name).
    #[arg(long)]
    pub name: Option<String>,
    /// Sequences decoded together (the batch's rows).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Sequences that may wait for a row; a request beyond it gets 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Seconds a request may take, queueing included; then it gets 504 (or an error event).
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// New tokens of a request that sets no `max_tokens`.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// libtorch's CPU threads (default: libtorch's choice, one per core). On a shared or small
    /// machine 1 can be many times faster for a small model: each step is many small ops.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Device instead of the run's model.device (auto for --model).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// Weight dtype instead of the run's model.dtype (auto for --model).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeChoice>,
}

/// What requests are checked against and rendered with.
pub struct ServedModel {
    pub name: String,
    /// The preference dimensions (empty without adapters).
    pub dimensions: Vec<String>,
    pub default_weights: Vec<f64>,
    pub tokenizer: ChatTokenizer,
    /// Prompt and answer together may not exceed this (`max_position_embeddings`).
    pub context_length: usize,
    pub default_max_tokens: usize,
    pub max_batch: usize,
    /// When the server started (Unix seconds).
    pub created: u64,
}

/// The directory name of `dir`, as the default model name.
fn dir_name(dir: &std::path::Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().to_string())
}

/// Loads the run (or model) of `args`: the model for the engine and what requests see.
fn load(args: &ServeArgs) -> Result<(CausalLm, ServedModel)> {
    let (model, tokenizer, dimensions, default_weights, dir) = match (&args.run, &args.model) {
        (Some(dir), _) => {
            let run = saved_run::read_run(dir)?;
            let dims = run.meta.dimensions.clone();
            let weights = match args.weights.as_slice() {
                [] => vec![1.0 / dims.len() as f64; dims.len()],
                given => given.to_vec(),
            };
            validate_weights(&weights, &dims, "--weights")?;
            let loaded = run.load(args.device, args.dtype)?;
            let tokenizer = loaded.run.tokenizer;
            (loaded.model.model, tokenizer, dims, weights, dir)
        }
        (None, Some(dir)) => {
            let device = model::select_device(args.device.unwrap_or_default(), 0)?;
            let kind = model::select_kind(args.dtype.unwrap_or_default(), device);
            let loaded = model::load_model(dir, None, device, kind)?;
            let tokenizer = ChatTokenizer::from_model_dir(dir, None)?;
            (loaded.model, tokenizer, vec![], vec![], dir)
        }
        (None, None) => bail!("give --run or --model"),
    };
    let served = ServedModel {
        name: args.name.clone().unwrap_or_else(|| dir_name(dir)),
        dimensions,
        default_weights,
        tokenizer,
        context_length: model.config().max_position_embeddings as usize,
        default_max_tokens: args.default_max_tokens,
        max_batch: args.max_batch,
        created: routes::unix_time(),
    };
    Ok((model, served))
}

/// Serves until SIGTERM or SIGINT, then stops taking connections, lets the requests in flight
/// finish, and returns.
pub fn serve(args: &ServeArgs) -> Result<()> {
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if !(args.request_timeout > 0.0 && args.request_timeout.is_finite()) {
        bail!(
            "--request-timeout {} is not a positive number of seconds",
            args.request_timeout
        );
    }
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads as i32);
    }
    let (model, served) = load(args)?;
    let engine_model = EngineModel {
        conditioned: !served.dimensions.is_empty(),
        dimensions: served.dimensions.len(),
        model,
    };
    let (engine, handle) = Engine::new(engine_model, args.max_batch, args.max_queue);
    let decoding = std::thread::Builder::new()
        .name("decode".into())
        .spawn(move || engine.run())?;
    let state = Arc::new(routes::AppState {
        served,
        engine: handle,
        timeout: Duration::from_secs_f64(args.request_timeout),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(listen(args, state))?;
    // Every handle to the engine is gone with the router: it finishes and returns.
    decoding
        .join()
        .map_err(|_| anyhow::anyhow!("the decoding thread panicked"))?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds, prints the address, and serves until a shutdown signal.
async fn listen(args: &ServeArgs, state: Arc<routes::AppState>) -> Result<()> {
    let address = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let bound: SocketAddr = listener.local_addr()?;
    // Scripts wait for this line (and read the port from it when --port 0).
    println!("listening on http://{bound}");
    tracing::info!(
        "serving {} on http://{bound} (playground at /, OpenAI API at /v1)",
        state.served.name
    );
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

/// Resolves at SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down: finishing the requests in flight");
}
