//! The engine against a fake model that records the batches it was given.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concierge_engine::{Backend, BatchLimits, Engine, EngineError};

#[derive(Default)]
struct Doubler {
    batches: Mutex<Vec<Vec<u32>>>,
    delay: Duration,
}

impl Backend for Doubler {
    type Input = u32;
    type Output = u32;
    fn cost(&self, input: &u32) -> usize {
        (*input as usize % 7) + 1
    }
    fn run(&self, batch: &[&u32]) -> Result<Vec<u32>, String> {
        if batch.iter().any(|&&x| x == 666) {
            panic!("the model hit a bad input");
        }
        std::thread::sleep(self.delay);
        self.batches.lock().unwrap().push(batch.iter().map(|&&x| x).collect());
        Ok(batch.iter().map(|&&x| x * 2).collect())
    }
}

fn limits(size: usize, wait_ms: u64, queued: usize) -> BatchLimits {
    BatchLimits { max_batch_size: size, max_batch_cost: 10_000, max_wait: Duration::from_millis(wait_ms), max_queued: queued }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_get_their_own_outputs_and_batches_form() {
    let engine = Arc::new(Engine::start("test", limits(16, 20, 1000)).unwrap());
    let model = Arc::new(Doubler { delay: Duration::from_millis(5), ..Default::default() });
    let mut tasks = Vec::new();
    for caller in 0..64u32 {
        let (engine, model) = (engine.clone(), model.clone());
        tasks.push(tokio::spawn(async move {
            let inputs: Vec<u32> = (0..3).map(|k| caller * 10 + k).collect();
            let rx = engine.submit(&model, inputs.clone(), None).unwrap();
            let mut out = Vec::new();
            for r in rx {
                out.push(r.await.unwrap().unwrap());
            }
            assert_eq!(out, inputs.iter().map(|x| x * 2).collect::<Vec<_>>());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let batches = model.batches.lock().unwrap();
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 192);
    assert!(batches.iter().all(|b| b.len() <= 16));
    assert!(batches.iter().any(|b| b.len() > 3), "no batch held more than one request: {batches:?}");
    assert_eq!(engine.queued(), 0);
}

#[tokio::test]
async fn batch_cost_limit_splits_batches() {
    let engine = Engine::start(
        "test",
        BatchLimits { max_batch_size: 100, max_batch_cost: 8, max_wait: Duration::from_millis(50), max_queued: 100 },
    )
    .unwrap();
    let model = Arc::new(Doubler::default());
    // costs: 6 -> 7, 5 -> 6, 13 -> 7: no two fit under 8
    let rx = engine.submit(&model, vec![6, 5, 13], None).unwrap();
    for r in rx {
        r.await.unwrap().unwrap();
    }
    assert_eq!(*model.batches.lock().unwrap(), vec![vec![6], vec![5], vec![13]]);
}

#[tokio::test]
async fn full_queue_is_refused_at_once_and_whole() {
    let engine = Engine::start("test", limits(1, 0, 4)).unwrap();
    let model = Arc::new(Doubler { delay: Duration::from_millis(200), ..Default::default() });
    let first = engine.submit(&model, vec![1, 2, 3], None).unwrap();
    let err = engine.submit(&model, vec![4, 5], None).unwrap_err();
    assert!(matches!(err, EngineError::Overloaded { queued: 3, limit: 4, .. }), "{err:?}");
    assert!(err.to_string().contains("retry"));
    for r in first {
        r.await.unwrap().unwrap();
    }
    // capacity is given back once answered
    let again = engine.submit(&model, vec![4, 5], None).unwrap();
    for r in again {
        r.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn expired_inputs_are_answered_not_computed() {
    let engine = Engine::start("test", limits(4, 0, 100)).unwrap();
    let model = Arc::new(Doubler { delay: Duration::from_millis(100), ..Default::default() });
    let busy = engine.submit(&model, vec![1], None).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let late = engine.submit(&model, vec![2], Some(Instant::now() + Duration::from_millis(20))).unwrap();
    let err = late.into_iter().next().unwrap().await.unwrap().unwrap_err();
    assert!(matches!(err, EngineError::DeadlineExceeded { .. }), "{err:?}");
    busy.into_iter().next().unwrap().await.unwrap().unwrap();
    assert!(model.batches.lock().unwrap().iter().all(|b| !b.contains(&2)));
}

#[tokio::test]
async fn cancelled_inputs_cost_no_compute() {
    let engine = Engine::start("test", limits(4, 0, 100)).unwrap();
    let model = Arc::new(Doubler { delay: Duration::from_millis(100), ..Default::default() });
    let busy = engine.submit(&model, vec![1], None).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(engine.submit(&model, vec![3, 4], None).unwrap());
    busy.into_iter().next().unwrap().await.unwrap().unwrap();
    let after = engine.submit(&model, vec![5], None).unwrap();
    after.into_iter().next().unwrap().await.unwrap().unwrap();
    let seen: Vec<u32> = model.batches.lock().unwrap().concat();
    assert_eq!(seen, vec![1, 5]);
    assert_eq!(engine.queued(), 0);
}

#[tokio::test]
async fn a_panicking_model_fails_its_batch_and_the_engine_keeps_serving() {
    let engine = Engine::start("test", limits(8, 30, 100)).unwrap();
    let model = Arc::new(Doubler::default());
    let bad = engine.submit(&model, vec![666, 1], None).unwrap();
    for r in bad {
        let err = r.await.unwrap().unwrap_err();
        assert!(matches!(&err, EngineError::Model(m) if m.contains("bad input")), "{err:?}");
    }
    let good = engine.submit(&model, vec![7], None).unwrap();
    assert_eq!(good.into_iter().next().unwrap().await.unwrap().unwrap(), 14);
}

#[tokio::test]
async fn batches_never_mix_model_versions() {
    let engine = Engine::start("test", limits(16, 50, 100)).unwrap();
    let (old, new) = (Arc::new(Doubler::default()), Arc::new(Doubler::default()));
    let a = engine.submit(&old, vec![1, 2], None).unwrap();
    let b = engine.submit(&new, vec![3], None).unwrap();
    let c = engine.submit(&old, vec![4], None).unwrap();
    for r in a.into_iter().chain(b).chain(c) {
        r.await.unwrap().unwrap();
    }
    assert_eq!(old.batches.lock().unwrap().concat(), vec![1, 2, 4]);
    assert_eq!(*new.batches.lock().unwrap(), vec![vec![3]]);
}

#[tokio::test]
async fn shutdown_drains_what_was_queued_and_refuses_new_work() {
    let engine = Engine::start("test", limits(2, 0, 100)).unwrap();
    let model = Arc::new(Doubler { delay: Duration::from_millis(20), ..Default::default() });
    let rx = engine.submit(&model, vec![1, 2, 3, 4, 5], None).unwrap();
    engine.shutdown();
    for r in rx {
        r.await.unwrap().unwrap();
    }
    assert_eq!(engine.submit(&model, vec![1], None).unwrap_err(), EngineError::ShuttingDown);
}

/// A model that logs which lane ran which input, and checks that no two batches overlap.
struct Logger {
    lane: &'static str,
    log: Arc<Mutex<Vec<(&'static str, u32)>>>,
    busy: Arc<std::sync::atomic::AtomicBool>,
    delay: Duration,
}

impl Backend for Logger {
    type Input = u32;
    type Output = u32;
    fn cost(&self, _: &u32) -> usize {
        1
    }
    fn run(&self, batch: &[&u32]) -> Result<Vec<u32>, String> {
        use std::sync::atomic::Ordering;
        assert!(!self.busy.swap(true, Ordering::SeqCst), "two batches ran on one device at once");
        std::thread::sleep(self.delay);
        self.log.lock().unwrap().extend(batch.iter().map(|&&x| (self.lane, x)));
        self.busy.store(false, Ordering::SeqCst);
        Ok(batch.iter().map(|&&x| x).collect())
    }
}

type TwoLanes = (concierge_engine::Device, Engine<Logger>, Engine<Logger>, Arc<Logger>, Arc<Logger>, Arc<Mutex<Vec<(&'static str, u32)>>>);

fn two_lanes(delay_ms: u64) -> TwoLanes {
    two_lanes_costing(delay_ms, delay_ms)
}

/// A "text" and an "image" lane on one device, with these batch times.
fn two_lanes_costing(text_ms: u64, image_ms: u64) -> TwoLanes {
    let device = concierge_engine::Device::start("shared").unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mk = |lane, ms| Arc::new(Logger { lane, log: log.clone(), busy: busy.clone(), delay: Duration::from_millis(ms) });
    let text = Engine::on(&device, "text", limits(1, 0, 1000)).unwrap();
    let image = Engine::on(&device, "image", limits(1, 0, 1000)).unwrap();
    let (t, i) = (mk("text", text_ms), mk("image", image_ms));
    (device, text, image, t, i, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_on_one_device_take_turns_and_never_overlap() {
    let (_device, text, image, tm, im, log) = two_lanes(5);
    // 30 text inputs queued first, then 30 images: the images must not wait for all the text.
    let t = text.submit(&tm, (0..30).collect(), None).unwrap();
    let i = image.submit(&im, (0..30).collect(), None).unwrap();
    for r in t.into_iter().chain(i) {
        r.await.unwrap().unwrap();
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 60);
    let first_image = log.iter().position(|(l, _)| *l == "image").unwrap();
    assert!(first_image <= 2, "the image lane waited behind {first_image} text batches: {log:?}");
    // While both lanes have work, neither runs more than one batch in a row (one more for the
    // batch that may already have been running when the images arrived).
    let both = &log[..40];
    let longest_run = both.chunk_by(|a, b| a.0 == b.0).map(<[_]>::len).max().unwrap();
    assert!(longest_run <= 2, "a lane ran {longest_run} batches in a row while the other waited: {both:?}");
    // Each lane's inputs still run in their own order.
    for lane in ["text", "image"] {
        let seen: Vec<u32> = log.iter().filter(|(l, _)| *l == lane).map(|(_, x)| *x).collect();
        assert_eq!(seen, (0..30).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_one_lane_down_leaves_the_others_serving() {
    let (device, text, image, tm, im, _log) = two_lanes(1);
    let queued = image.submit(&im, vec![1, 2, 3], None).unwrap();
    image.shutdown();
    for r in queued {
        r.await.unwrap().unwrap();
    }
    assert_eq!(image.submit(&im, vec![4], None).unwrap_err(), EngineError::ShuttingDown);
    let r = text.submit(&tm, vec![5], None).unwrap();
    assert_eq!(r.into_iter().next().unwrap().await.unwrap().unwrap(), 5);
    // Stopping the device drains and closes every lane still on it.
    let last = text.submit(&tm, vec![6, 7], None).unwrap();
    device.shutdown();
    for r in last {
        r.await.unwrap().unwrap();
    }
    assert_eq!(text.submit(&tm, vec![8], None).unwrap_err(), EngineError::ShuttingDown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlogged_lanes_get_equal_device_time_not_equal_turns() {
    // Image batches cost 10x text batches: with both lanes backlogged, text must get about ten
    // batches per image batch (equal time), not one (equal turns).
    let (_device, text, image, tm, im, log) = two_lanes_costing(2, 20);
    let i = image.submit(&im, (0..12).collect(), None).unwrap();
    let t = text.submit(&tm, (0..400).collect(), None).unwrap();
    for r in i {
        r.await.unwrap().unwrap();
    }
    let log_at_images_done = log.lock().unwrap().clone();
    let texts = log_at_images_done.iter().filter(|(l, _)| *l == "text").count();
    assert!(
        (60..=200).contains(&texts),
        "while 12 image batches (240 ms) ran, {texts} text batches (2 ms each) ran; equal time is about 120"
    );
    for r in t {
        r.await.unwrap().unwrap();
    }
}
