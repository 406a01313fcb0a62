//! Model slots: each holds the `Arc` of the version now serving. A request takes the `Arc` when
//! it starts and keeps it to the end, so replacing a slot (checkpoint hot swap) never disturbs
//! work in flight; the old version is dropped with its last user.
use std::sync::{Arc, RwLock};

use crate::error::ServiceError;

pub struct ModelSlot<T: ?Sized> {
    name: &'static str,
    current: RwLock<Option<Arc<T>>>,
}

impl<T: ?Sized> ModelSlot<T> {
    /// `name` completes "… is still loading": "the text model", "the knowledge base".
    pub fn empty(name: &'static str) -> Self {
        Self { name, current: RwLock::new(None) }
    }

    /// The serving version, or UNAVAILABLE while none is loaded.
    pub fn get(&self) -> Result<Arc<T>, ServiceError> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ServiceError::Unavailable(format!("{} is still loading; retry shortly", self.name)))
    }

    /// Puts `model` in service; returns the version it replaced.
    pub fn replace(&self, model: Arc<T>) -> Option<Arc<T>> {
        self.current.write().unwrap_or_else(|e| e.into_inner()).replace(model)
    }
}
