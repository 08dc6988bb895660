//! Continuous batching: one thread owns the model and decodes every running sequence together,
//! one row per sequence with that sequence's own preference weights `w` and KV cache.
//!
//! A job (one completion choice) waits in a queue until a row is free; between two decoding
//! steps the engine takes waiting jobs, runs each prompt alone through
//! [`CausalLm::forward_cached`] (its first token comes from there), and the job joins the next
//! step's batch ([`CausalLm::decode_rows`]). A job ends at the end-of-sequence token, at its
//! token budget, or when its caller stops listening (a stop string, a timeout, a closed
//! connection): its row is then free for the next job.
//!
//! A sequence's greedy tokens do not depend on what else is in the batch: attention is per row,
//! and the batch always has `max_batch` rows (free rows are padding), because the GEMMs' last
//! bits depend on their row count (measured with libtorch on CPU: a row of `x W^T` differs by
//! ~1e-5 between 1, 3 and 16 rows, and not at all between positions of a fixed row count).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc::UnboundedSender;

use crate::model::generate::{pick, GenerateOptions};
use crate::model::{CausalLm, Conditioning, KvCache};

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The end-of-sequence token (included in the tokens sent).
    EndOfSequence,
    /// `max_new_tokens` tokens.
    Length,
}

/// What the engine tells a job's caller, tagged with the job's choice index.
#[derive(Debug)]
pub enum Event {
    Token(u32),
    Finished(Finish),
    Failed(String),
}

/// One sequence to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    /// The preference weights of this sequence (one per dimension; empty without adapters).
    pub weights: Vec<f32>,
    pub options: GenerateOptions,
    /// Which choice of its request this job is.
    pub choice: usize,
    pub events: UnboundedSender<(usize, Event)>,
}

/// The model the engine runs.
pub struct EngineModel {
    pub model: CausalLm,
    /// Whether the model has preference adapters (else it runs as the base model).
    pub conditioned: bool,
    /// Number of preference dimensions k (0 without adapters).
    pub dimensions: usize,
}

/// Where requests hand jobs to the engine, and how many wait.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    waiting: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    counters: Arc<StepCounters>,
    max_queue: usize,
}

/// What the engine has done since it started: decoding steps and the sequences they advanced
/// (their ratio is the mean batch occupancy).
#[derive(Debug, Default)]
pub struct StepCounters {
    pub steps: AtomicU64,
    pub rows: AtomicU64,
}

/// The queue is full: `waiting` jobs wait, at most `max_queue` may.
#[derive(Debug)]
pub struct QueueFull {
    pub waiting: usize,
    pub max_queue: usize,
}

impl EngineHandle {
    /// Queues `jobs` (the choices of one request) together, or none of them when they would
    /// take the queue past `max_queue`.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<(), QueueFull> {
        let n = jobs.len();
        let claimed = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| {
                (waiting + n <= self.max_queue).then_some(waiting + n)
            });
        if let Err(waiting) = claimed {
            return Err(QueueFull {
                waiting,
                max_queue: self.max_queue,
            });
        }
        for job in jobs {
            // The engine only stops once every handle is gone, so this send cannot fail.
            let _ = self.jobs.send(job);
        }
        Ok(())
    }

    /// Jobs waiting for a row.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Sequences being decoded.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Decoding steps so far, and the sequences they advanced.
    pub fn steps_and_rows(&self) -> (u64, u64) {
        let c = &self.counters;
        (
            c.steps.load(Ordering::SeqCst),
            c.rows.load(Ordering::SeqCst),
        )
    }
}

/// A sequence in a row of the batch.
struct Sequence {
    options: GenerateOptions,
    rng: ChaCha8Rng,
    weights: Vec<f32>,
    /// The last token, the next step's input.
    last: u32,
    generated: usize,
    choice: usize,
    events: UnboundedSender<(usize, Event)>,
}

impl Sequence {
    /// Sends `token` and says whether the sequence goes on: not at its end-of-sequence token,
    /// its token budget, or a caller that stopped listening.
    fn accept(&mut self, token: u32) -> bool {
        self.last = token;
        self.generated += 1;
        let finish = if Some(token) == self.options.eos_token_id {
            Some(Finish::EndOfSequence)
        } else if self.generated >= self.options.max_new_tokens {
            Some(Finish::Length)
        } else {
            None
        };
        let sent = self.events.send((self.choice, Event::Token(token))).is_ok();
        match finish {
            Some(finish) => {
                let _ = self.events.send((self.choice, Event::Finished(finish)));
                false
            }
            None => sent,
        }
    }
}

/// The decoding loop's state: `max_batch` rows, each free or holding a sequence and its cache.
pub struct Engine {
    model: EngineModel,
    device: Device,
    rows: Vec<Option<Sequence>>,
    caches: Vec<KvCache>,
    jobs: mpsc::Receiver<Job>,
    waiting: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    counters: Arc<StepCounters>,
}

impl Engine {
    /// An engine of `max_batch` rows and its handle (`max_queue` jobs may wait).
    pub fn new(model: EngineModel, max_batch: usize, max_queue: usize) -> (Engine, EngineHandle) {
        let (sender, receiver) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(StepCounters::default());
        let device = model.model.embedding_device();
        let engine = Engine {
            model,
            device,
            rows: (0..max_batch).map(|_| None).collect(),
            caches: (0..max_batch).map(|_| KvCache::default()).collect(),
            jobs: receiver,
            waiting: waiting.clone(),
            running: running.clone(),
            counters: counters.clone(),
        };
        let handle = EngineHandle {
            jobs: sender,
            waiting,
            running,
            counters,
            max_queue,
        };
        (engine, handle)
    }

    /// Decodes until every handle is dropped and no sequence is left.
    pub fn run(mut self) {
        let _no_grad = tch::no_grad_guard();
        loop {
            if self.rows.iter().all(Option::is_none) {
                match self.jobs.recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => return, // every handle dropped: the server has shut down
                }
            }
            while self.rows.iter().any(Option::is_none) {
                match self.jobs.try_recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => break,
                }
            }
            if self.rows.iter().any(Option::is_some) {
                self.step();
            }
            let running = self.rows.iter().filter(|r| r.is_some()).count();
            self.running.store(running, Ordering::SeqCst);
        }
    }

    /// The adapters' conditioning for weights [rows, k] (None without adapters).
    fn conditioning<'a>(&self, weights: &'a Option<Tensor>) -> Conditioning<'a> {
        match weights {
            Some(w) => Conditioning::Weighted(w),
            None => Conditioning::Reference,
        }
    }

    /// weights: one vector of k per row -> [rows, k] f32 on the model's device, or None
    /// without adapters.
    fn weight_tensor(&self, weights: &[&[f32]]) -> Option<Tensor> {
        if !self.model.conditioned {
            return None;
        }
        let k = self.model.dimensions as i64;
        let flat: Vec<f32> = weights.iter().flat_map(|w| w.iter().copied()).collect();
        let w = Tensor::from_slice(&flat).view([weights.len() as i64, k]);
        Some(w.to_kind(Kind::Float).to_device(self.device)) // [rows, k]
    }

    /// Runs a waiting job's prompt and puts it in a free row, unless it ends at once.
    fn admit(&mut self, job: Job) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        if job.events.is_closed() {
            return; // its caller left while it waited
        }
        let (cache, logits) = self.prefill(&job);
        let mut sequence = Sequence {
            rng: ChaCha8Rng::seed_from_u64(job.options.seed),
            options: job.options,
            weights: job.weights,
            last: 0,
            generated: 0,
            choice: job.choice,
            events: job.events,
        };
        let first = match pick(&logits, &sequence.options, &mut sequence.rng) {
            Ok(token) => token,
            Err(e) => return sequence.fail(e),
        };
        if sequence.accept(first) {
            let row = self
                .rows
                .iter()
                .position(Option::is_none)
                .expect("a free row");
            self.caches[row] = cache;
            self.rows[row] = Some(sequence);
        }
    }

    /// The prompt through the model alone: its cache and the last position's logits [vocab].
    fn prefill(&self, job: &Job) -> (KvCache, Tensor) {
        let ids: Vec<i64> = job.prompt.iter().map(|&t| i64::from(t)).collect();
        let input = Tensor::from_slice(&ids).unsqueeze(0).to_device(self.device); // [1, t]
        let weights = self.weight_tensor(&[&job.weights]); // [1, k]
        let mut cache = KvCache::default();
        let logits =
            self.model
                .model
                .forward_cached(&input, &mut cache, self.conditioning(&weights)); // [1, t, vocab]
        let last = logits.select(0, 0).select(0, -1).to_kind(Kind::Float); // [vocab]
        (cache, last)
    }

    /// One token for every sequence in the batch.
    fn step(&mut self) {
        let active: Vec<bool> = self.rows.iter().map(Option::is_some).collect();
        let tokens: Vec<i64> = self
            .rows
            .iter()
            .map(|r| r.as_ref().map_or(0, |s| i64::from(s.last)))
            .collect();
        let zeros = vec![0f32; self.model.dimensions];
        let weights: Vec<&[f32]> = self
            .rows
            .iter()
            .map(|r| {
                r.as_ref()
                    .map_or(zeros.as_slice(), |s| s.weights.as_slice())
            })
            .collect();
        let weights = self.weight_tensor(&weights); // [rows, k]
        let input = Tensor::from_slice(&tokens)
            .view([tokens.len() as i64, 1])
            .to_device(self.device); // [rows, 1]
        let cond = self.conditioning(&weights);
        let advanced = active.iter().filter(|&&a| a).count() as u64;
        self.counters.steps.fetch_add(1, Ordering::SeqCst);
        self.counters.rows.fetch_add(advanced, Ordering::SeqCst);
        let logits = self
            .model
            .model
            .decode_rows(&input, &mut self.caches, &active, cond)
            .to_kind(Kind::Float); // [rows, vocab]
        for (i, row) in self.rows.iter_mut().enumerate() {
            let Some(sequence) = row else { continue };
            let next = pick(&logits.get(i as i64), &sequence.options, &mut sequence.rng);
            let goes_on = match next {
                Ok(token) => sequence.accept(token),
                Err(e) => {
                    sequence.fail(e);
                    false
                }
            };
            if !goes_on {
                *row = None;
                self.caches[i] = KvCache::default();
            }
        }
    }
}

impl Sequence {
    fn fail(&self, error: anyhow::Error) {
        let _ = self
            .events
            .send((self.choice, Event::Failed(format!("{error:#}"))));
    }
}
