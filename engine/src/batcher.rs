//! The queues and the device thread.
//!
//! A [`Device`] is one thread that owns the accelerator (or the CPU's compute). Lanes
//! ([`Engine`]s: "text", "image", ...) are attached to a device; each has its own queue and
//! [`BatchLimits`]. The device thread runs one batch at a time, from the lanes whose next batch
//! is due (full, or its oldest input has waited `max_wait`). Among those it picks the lane that
//! has had the least device time (start-time fair queuing: each lane's clock advances by the
//! seconds its batches ran, and a lane that was idle rejoins at the busy lanes' clock, so idling
//! banks no credit). Under mixed load each backlogged lane gets an equal share of device time,
//! whatever its batches cost: a 300 ms image batch is followed by 300 ms of text batches, not
//! by one 10 ms text batch. Neither starves: a lane with a due batch waits at most until every
//! other lane has run about one batch more than it.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The device thread.

/// What the device thread needs of a lane, whatever its model type.
trait LaneOps: Send + Sync {
    /// When this lane's next batch is due; `None` when its queue is empty.
    fn due(&self) -> Option<Instant>;
    /// Takes the next batch and returns the work that runs and answers it.
    fn take(self: Arc<Self>) -> Option<Box<dyn FnOnce() + Send>>;
    /// Refuses new inputs; what is queued still runs, without waiting to fill a batch.
    fn close(&self);
}

struct LaneEntry {
    ops: Arc<dyn LaneOps>,
    /// Device seconds this lane's batches have used (its fair-queuing clock).
    clock: f64,
    /// It had work at the last scan.
    backlogged: bool,
}

struct DeviceState {
    lanes: Vec<LaneEntry>,
    /// Where the scan starts next (ties between equal clocks go round-robin).
    next: usize,
    closing: bool,
}

struct DeviceShared {
    state: Mutex<DeviceState>,
    wake: Condvar,
}

impl DeviceShared {
    fn notify(&self) {
        let _guard = lock(&self.state);
        self.wake.notify_one();
    }
}

struct DeviceCore {
    name: String,
    shared: Arc<DeviceShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl DeviceCore {
    fn shutdown(&self) {
        {
            let mut st = lock(&self.shared.state);
            st.closing = true;
            for lane in &st.lanes {
                lane.ops.close();
            }
            self.shared.wake.notify_one();
        }
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for DeviceCore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One device thread that the lanes attached to it share. Cheap to clone; the thread stops
/// (after running everything queued) when [`Device::shutdown`] is called or the last handle,
/// including the lanes' own, is dropped.
#[derive(Clone)]
pub struct Device(Arc<DeviceCore>);

impl Device {
    /// Starts the thread `concierge-{name}-device`.
    pub fn start(name: &str) -> std::io::Result<Self> {
        let shared = Arc::new(DeviceShared {
            state: Mutex::new(DeviceState { lanes: Vec::new(), next: 0, closing: false }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("concierge-{name}-device"))
            .spawn(move || device_loop(&s))?;
        Ok(Self(Arc::new(DeviceCore { name: name.to_string(), shared, thread: Mutex::new(Some(thread)) })))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Closes every lane, runs what they hold, and waits for the thread to end.
    pub fn shutdown(&self) {
        self.0.shutdown();
    }
}

fn device_loop(shared: &DeviceShared) {
    let mut st = lock(&shared.state);
    loop {
        let now = Instant::now();
        let n = st.lanes.len();
        let dues: Vec<Option<Instant>> = st.lanes.iter().map(|l| l.ops.due()).collect();
        // A lane that had no work rejoins at the clock of the lanes that kept busy.
        let floor = st
            .lanes
            .iter()
            .zip(&dues)
            .filter(|(l, d)| l.backlogged && d.is_some())
            .map(|(l, _)| l.clock)
            .fold(f64::INFINITY, f64::min);
        for (l, d) in st.lanes.iter_mut().zip(&dues) {
            if d.is_some() && !l.backlogged && floor.is_finite() {
                l.clock = l.clock.max(floor);
            }
            l.backlogged = d.is_some();
        }
        let mut pick: Option<usize> = None;
        let mut earliest: Option<Instant> = None;
        for k in 0..n {
            let i = (st.next + k) % n;
            match dues[i] {
                Some(due) if due <= now => {
                    if pick.is_none_or(|p| st.lanes[i].clock < st.lanes[p].clock) {
                        pick = Some(i);
                    }
                }
                Some(due) => earliest = Some(earliest.map_or(due, |e| e.min(due))),
                None => {}
            }
        }
        if let Some(i) = pick {
            st.next = (i + 1) % n;
            let lane = st.lanes[i].ops.clone();
            drop(st);
            let t0 = Instant::now();
            if let Some(work) = lane.clone().take() {
                work();
            }
            let ran = t0.elapsed().as_secs_f64();
            st = lock(&shared.state);
            // The lane may have been detached while its batch ran.
            if let Some(l) = st.lanes.iter_mut().find(|l| Arc::ptr_eq(&l.ops, &lane)) {
                l.clock += ran;
            }
            continue;
        }
        if st.closing && earliest.is_none() {
            break;
        }
        st = match earliest {
            Some(t) => shared.wake.wait_timeout(st, t.saturating_duration_since(now)).unwrap_or_else(|e| e.into_inner()).0,
            None => shared.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
    }
    tracing::info!("device thread drained and stopped");
}

// ---------------------------------------------------------------------------------------------
// A lane.

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

struct Queue<B: Backend> {
    pending: VecDeque<Item<B>>,
    open: bool,
    /// A batch of this lane is on the device.
    running: bool,
}

struct Lane<B: Backend> {
    name: &'static str,
    limits: BatchLimits,
    queue: Mutex<Queue<B>>,
    /// Signalled when the queue is empty and no batch of this lane is running.
    idle: Condvar,
}

impl<B: Backend> LaneOps for Lane<B> {
    fn due(&self) -> Option<Instant> {
        let q = lock(&self.queue);
        let oldest = q.pending.front()?.enqueued;
        if !q.open || is_full(&q.pending, &self.limits) {
            Some(oldest)
        } else {
            Some(oldest + self.limits.max_wait)
        }
    }

    fn take(self: Arc<Self>) -> Option<Box<dyn FnOnce() + Send>> {
        let mut q = lock(&self.queue);
        let batch = take_batch(self.name, &mut q.pending, &self.limits);
        if batch.is_empty() {
            if q.pending.is_empty() {
                self.idle.notify_all();
            }
            return None;
        }
        q.running = true;
        drop(q);
        Some(Box::new(move || {
            run_batch(self.name, batch);
            let mut q = lock(&self.queue);
            q.running = false;
            if q.pending.is_empty() {
                self.idle.notify_all();
            }
        }))
    }

    fn close(&self) {
        lock(&self.queue).open = false;
    }
}

/// A batching lane: its queue and limits, on a [`Device`] it may share with other lanes.
pub struct Engine<B: Backend> {
    lane: Arc<Lane<B>>,
    device: Device,
    queued: Arc<AtomicUsize>,
    /// The lane started its own device (see [`Engine::start`]) and stops it with itself.
    owns_device: bool,
}

impl<B: Backend> Engine<B> {
    /// Starts `lane` ("text", "image", ...) on a device thread of its own.
    pub fn start(lane: &'static str, limits: BatchLimits) -> std::io::Result<Self> {
        check_limits(lane, &limits)?;
        let device = Device::start(lane)?;
        let mut engine = Self::on(&device, lane, limits)?;
        engine.owns_device = true;
        Ok(engine)
    }

    /// Attaches `lane` to `device`, which shares its time fairly among its lanes.
    pub fn on(device: &Device, lane: &'static str, limits: BatchLimits) -> std::io::Result<Self> {
        check_limits(lane, &limits)?;
        let l = Arc::new(Lane {
            name: lane,
            limits,
            queue: Mutex::new(Queue { pending: VecDeque::new(), open: true, running: false }),
            idle: Condvar::new(),
        });
        {
            let mut st = lock(&device.0.shared.state);
            if st.closing {
                return Err(std::io::Error::other(format!("device {} is shutting down", device.name())));
            }
            // A new lane starts at the busiest-so-far clock floor, as a lane coming back from idle.
            let clock = st.lanes.iter().map(|l| l.clock).fold(f64::INFINITY, f64::min);
            st.lanes.push(LaneEntry { ops: l.clone(), clock: if clock.is_finite() { clock } else { 0.0 }, backlogged: false });
        }
        Ok(Self { lane: l, device: device.clone(), queued: Arc::new(AtomicUsize::new(0)), owns_device: false })
    }

    /// Inputs admitted and not yet answered.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// This lane's limits.
    pub fn limits(&self) -> &BatchLimits {
        &self.lane.limits
    }

    /// Admits all of `inputs` or none: a request is never half-queued.
    pub fn submit(
        &self,
        model: &Arc<B>,
        inputs: Vec<B::Input>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Pending<B::Output>>, EngineError> {
        let name = self.lane.name;
        let n = inputs.len();
        let limit = self.lane.limits.max_queued;
        let admitted = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q + n <= limit).then_some(q + n));
        if let Err(queued) = admitted {
            return Err(EngineError::Overloaded { lane: name, queued, limit });
        }
        metrics::gauge!("concierge_queue_depth", "lane" => name).set((admitted.unwrap() + n) as f64);
        // Slots exist before anything can fail below, so the count is given back on every path.
        let mut slots: Vec<Slot> = (0..n).map(|_| Slot(self.queued.clone(), name)).collect();
        let now = Instant::now();
        let mut receivers = Vec::with_capacity(n);
        let mut items = Vec::with_capacity(n);
        for input in inputs {
            let (reply, rx) = oneshot::channel();
            items.push(Item {
                cost: model.cost(&input),
                model: model.clone(),
                input,
                deadline,
                enqueued: now,
                reply,
                _slot: slots.pop().expect("one slot per input"),
            });
            receivers.push(rx);
        }
        {
            let mut q = lock(&self.lane.queue);
            if !q.open {
                return Err(EngineError::ShuttingDown);
            }
            q.pending.extend(items);
        }
        self.device.0.shared.notify();
        Ok(receivers)
    }

    /// Stops accepting, lets the device finish everything this lane holds, and waits for it.
    pub fn shutdown(&self) {
        self.lane.close();
        self.device.0.shared.notify();
        {
            let mut q = lock(&self.lane.queue);
            while !q.pending.is_empty() || q.running {
                q = self.lane.idle.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        }
        {
            let mut st = lock(&self.device.0.shared.state);
            let me: Arc<dyn LaneOps> = self.lane.clone();
            st.lanes.retain(|l| !Arc::ptr_eq(&l.ops, &me));
            st.next = 0;
        }
        if self.owns_device {
            self.device.shutdown();
        }
    }
}

impl<B: Backend> Drop for Engine<B> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn check_limits(lane: &str, limits: &BatchLimits) -> std::io::Result<()> {
    if limits.max_batch_size == 0 || limits.max_batch_cost == 0 || limits.max_queued == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{lane} lane: batch size, batch cost and queue limits must all be at least 1: {limits:?}"),
        ));
    }
    Ok(())
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
        Err(panic) => Err(crate::panic_message(panic.as_ref()).unwrap_or_else(|| "panic".into())),
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
