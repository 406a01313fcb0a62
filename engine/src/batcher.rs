//! The queue and the device thread.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::{Backend, EngineError};

/// Limits of one lane's batches and queue.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    /// Most inputs in one batch.
    pub max_batch_size: usize,
    /// Most total cost (tokens) in one batch; a single costlier input still runs alone.
    pub max_batch_cost: usize,
    /// How long the oldest waiting input may wait for a batch to fill.
    pub max_wait: Duration,
    /// Most inputs admitted and not yet answered; more are refused at once.
    pub max_queued: usize,
}

/// The receiving end of one submitted input.
pub type Pending<O> = oneshot::Receiver<Result<O, EngineError>>;

struct Item<B: Backend> {
    model: Arc<B>,
    input: B::Input,
    cost: usize,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<B::Output, EngineError>>,
    _slot: Slot,
}

impl<B: Backend> Item<B> {
    /// Gives the queue slot back first, so a caller that sees its answer also sees the queue
    /// without its input.
    fn answer(self, result: Result<B::Output, EngineError>) {
        let Item { reply, _slot, .. } = self;
        drop(_slot);
        let _ = reply.send(result);
    }
}

/// One admitted input's place in the queue, given back when the input is answered or dropped.
struct Slot(Arc<AtomicUsize>, &'static str);

impl Drop for Slot {
    fn drop(&mut self) {
        let left = self.0.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("concierge_queue_depth", "lane" => self.1).set(left as f64);
    }
}

/// A batching lane: its queue and the thread that owns the device for it.
pub struct Engine<B: Backend> {
    lane: &'static str,
    tx: Mutex<Option<mpsc::Sender<Item<B>>>>,
    queued: Arc<AtomicUsize>,
    limits: BatchLimits,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<B: Backend> Engine<B> {
    /// Starts the device thread for `lane` ("text", "image", ...).
    pub fn start(lane: &'static str, limits: BatchLimits) -> std::io::Result<Self> {
        if limits.max_batch_size == 0 || limits.max_batch_cost == 0 || limits.max_queued == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{lane} lane: batch size, batch cost and queue limits must all be at least 1: {limits:?}"),
            ));
        }
        let (tx, rx) = mpsc::channel();
        let l = limits.clone();
        let thread = std::thread::Builder::new()
            .name(format!("concierge-{lane}-device"))
            .spawn(move || device_loop::<B>(lane, rx, l))?;
        Ok(Self {
            lane,
            tx: Mutex::new(Some(tx)),
            queued: Arc::new(AtomicUsize::new(0)),
            limits,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Inputs admitted and not yet answered.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Admits all of `inputs` or none: a request is never half-queued.
    pub fn submit(
        &self,
        model: &Arc<B>,
        inputs: Vec<B::Input>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Pending<B::Output>>, EngineError> {
        let n = inputs.len();
        let limit = self.limits.max_queued;
        let admitted = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q + n <= limit).then_some(q + n));
        if let Err(queued) = admitted {
            return Err(EngineError::Overloaded { lane: self.lane, queued, limit });
        }
        metrics::gauge!("concierge_queue_depth", "lane" => self.lane).set((admitted.unwrap() + n) as f64);
        // Slots exist before anything can fail below, so the count is given back on every path.
        let mut slots: Vec<Slot> = (0..n).map(|_| Slot(self.queued.clone(), self.lane)).collect();
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err(EngineError::ShuttingDown);
        };
        let now = Instant::now();
        let mut receivers = Vec::with_capacity(n);
        for input in inputs {
            let (reply, rx) = oneshot::channel();
            let item = Item {
                cost: model.cost(&input),
                model: model.clone(),
                input,
                deadline,
                enqueued: now,
                reply,
                _slot: slots.pop().expect("one slot per input"),
            };
            if tx.send(item).is_err() {
                return Err(EngineError::ShuttingDown);
            }
            receivers.push(rx);
        }
        Ok(receivers)
    }

    /// Stops accepting, lets the device thread finish everything queued, and waits for it.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl<B: Backend> Drop for Engine<B> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn device_loop<B: Backend>(lane: &'static str, rx: mpsc::Receiver<Item<B>>, limits: BatchLimits) {
    let mut pending: VecDeque<Item<B>> = VecDeque::new();
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                break;
            }
            match rx.recv() {
                Ok(item) => pending.push_back(item),
                Err(_) => break,
            }
        }
        // Take what has arrived; while the batch is not full, wait for more, but never make
        // the oldest input wait longer than max_wait in all.
        let oldest = pending.front().map(|i| i.enqueued).unwrap_or_else(Instant::now);
        while open && !is_full(&pending, &limits) {
            let now = Instant::now();
            let until = oldest + limits.max_wait;
            let next = match rx.try_recv() {
                Ok(item) => Ok(item),
                Err(mpsc::TryRecvError::Empty) if now < until => rx.recv_timeout(until - now),
                Err(mpsc::TryRecvError::Empty) => Err(mpsc::RecvTimeoutError::Timeout),
                Err(mpsc::TryRecvError::Disconnected) => Err(mpsc::RecvTimeoutError::Disconnected),
            };
            match next {
                Ok(item) => pending.push_back(item),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
            }
        }
        let batch = take_batch(lane, &mut pending, &limits);
        if !batch.is_empty() {
            run_batch(lane, batch);
        }
    }
    tracing::info!(lane, "device thread drained and stopped");
}

fn is_full<B: Backend>(pending: &VecDeque<Item<B>>, limits: &BatchLimits) -> bool {
    pending.len() >= limits.max_batch_size || pending.iter().map(|i| i.cost).sum::<usize>() >= limits.max_batch_cost
}

/// Picks the next batch from the front of the queue: same model version as the first live
/// input, within the limits. Expired inputs are answered; abandoned ones are dropped.
fn take_batch<B: Backend>(lane: &'static str, pending: &mut VecDeque<Item<B>>, limits: &BatchLimits) -> Vec<Item<B>> {
    let now = Instant::now();
    let mut batch: Vec<Item<B>> = Vec::new();
    let mut cost = 0;
    let mut keep = VecDeque::with_capacity(pending.len());
    while let Some(item) = pending.pop_front() {
        if item.reply.is_closed() {
            metrics::counter!("concierge_dropped_total", "lane" => lane, "reason" => "cancelled").increment(1);
            continue;
        }
        if item.deadline.is_some_and(|d| d <= now) {
            metrics::counter!("concierge_dropped_total", "lane" => lane, "reason" => "deadline").increment(1);
            let waited_ms = now.duration_since(item.enqueued).as_millis() as u64;
            item.answer(Err(EngineError::DeadlineExceeded { waited_ms }));
            continue;
        }
        let fits = batch.is_empty()
            || (batch.len() < limits.max_batch_size
                && cost + item.cost <= limits.max_batch_cost
                && Arc::ptr_eq(&batch[0].model, &item.model));
        if fits {
            cost += item.cost;
            batch.push(item);
        } else {
            keep.push_back(item);
            if batch.len() >= limits.max_batch_size {
                break;
            }
        }
    }
    keep.extend(pending.drain(..));
    *pending = keep;
    batch
}

fn run_batch<B: Backend>(lane: &'static str, batch: Vec<Item<B>>) {
    let start = Instant::now();
    let tokens: usize = batch.iter().map(|i| i.cost).sum();
    for item in &batch {
        metrics::histogram!("concierge_queue_wait_seconds", "lane" => lane)
            .record(start.duration_since(item.enqueued).as_secs_f64());
    }
    metrics::histogram!("concierge_batch_size", "lane" => lane).record(batch.len() as f64);
    metrics::histogram!("concierge_batch_tokens", "lane" => lane).record(tokens as f64);
    let model = batch[0].model.clone();
    let inputs: Vec<&B::Input> = batch.iter().map(|i| &i.input).collect();
    // A panicking model must not take the device thread (and every later request) with it.
    let result = match catch_unwind(AssertUnwindSafe(|| model.run(&inputs))) {
        Ok(Ok(out)) if out.len() == inputs.len() => Ok(out),
        Ok(Ok(out)) => Err(format!("model returned {} outputs for {} inputs", out.len(), inputs.len())),
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())),
    };
    drop(inputs);
    metrics::histogram!("concierge_inference_seconds", "lane" => lane).record(start.elapsed().as_secs_f64());
    match result {
        Ok(outputs) => {
            for (item, out) in batch.into_iter().zip(outputs) {
                item.answer(Ok(out));
            }
        }
        Err(e) => {
            tracing::error!(lane, error = %e, size = batch.len(), "batch failed");
            for item in batch {
                item.answer(Err(EngineError::Model(e.clone())));
            }
        }
    }
}
