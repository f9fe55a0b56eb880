//! One thread's instances of a list of component slots ([`Bank`]), and the lifecycle hooks
//! every thread runs ([`Hooks`]): made on the thread that uses them, swapped on reload, made
//! anew after a panic.

use abi_stable::std_types::RResult;
use plughost_plugin_api::abi::{
    CleanerBox, Component, ComponentKind, CronJobBox, EventListenerBox, HostBox, HttpHandlerBox,
    LifecycleBox, MiddlewareBox, PluginError as FfiError, ProcessBox, SocketBox, TaskHandlerBox,
    WebSocketBox, WorkerInfo,
};

use crate::{error::PluginError, plugin::Slot, runtime::calls};

/// Unwraps a component of a known kind.
pub(crate) trait Unwrap: Sized {
    fn unwrap(c: Component) -> Option<Self>;
}

macro_rules! unwrap_kind {
    ($ty:ty, $variant:ident) => {
        impl Unwrap for $ty {
            fn unwrap(c: Component) -> Option<Self> {
                match c {
                    Component::$variant(x) => Some(x),
                    _ => None,
                }
            }
        }
    };
}
unwrap_kind!(TaskHandlerBox, TaskHandler);
unwrap_kind!(EventListenerBox, EventListener);
unwrap_kind!(CronJobBox, CronJob);
unwrap_kind!(ProcessBox, Process);
unwrap_kind!(LifecycleBox, Lifecycle);
unwrap_kind!(HttpHandlerBox, HttpHandler);
unwrap_kind!(MiddlewareBox, Middleware);
unwrap_kind!(CleanerBox, Cleaner);
unwrap_kind!(WebSocketBox, WebSocket);
unwrap_kind!(SocketBox, Socket);

/// One thread's instances of a list of slots. `None` is an instance whose factory failed
/// after a panic; it is made again on next use.
pub(crate) struct Bank<T> {
    pub slots: Vec<Slot>,
    pub items: Vec<Option<T>>,
}

impl<T> Drop for Bank<T> {
    fn drop(&mut self) {
        // Dropping an instance runs plugin code too: record whose.
        for (slot, item) in self.slots.iter().zip(self.items.iter_mut()) {
            let _inside = calls::enter(slot.call);
            drop(item.take());
        }
    }
}

impl<T> std::fmt::Debug for Bank<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bank")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl<T: Unwrap> Bank<T> {
    /// Instances of every slot, or the first error.
    pub fn create(
        slots: &[Slot],
        host: &HostBox,
        info: WorkerInfo,
    ) -> Result<Bank<T>, PluginError> {
        let items = slots
            .iter()
            .map(|s| s.instantiate(host, info).map(T::unwrap))
            .collect::<Result<_, _>>()?;
        Ok(Bank {
            slots: slots.to_vec(),
            items,
        })
    }

    /// Creates what moving to `slots` needs (instances of the slots that are new); changes
    /// nothing, so a failure leaves every instance as it was.
    pub fn prepare(
        &self,
        slots: &[Slot],
        host: &HostBox,
        info: WorkerInfo,
    ) -> Result<Swap, PluginError> {
        let mut made = Vec::with_capacity(slots.len());
        for s in slots {
            match self.slots.iter().position(|o| o.same_as(s)) {
                Some(i) => made.push(Ok(i)),
                None => made.push(Err(s.instantiate(host, info)?)),
            }
        }
        Ok(Swap {
            slots: slots.to_vec(),
            made,
        })
    }

    /// Moves to a prepared swap: unchanged instances are kept. Returns the replaced instances
    /// (with their slots) and, per new entry, whether it is a new instance.
    pub fn apply(&mut self, swap: Swap) -> (Vec<(Slot, T)>, Vec<bool>) {
        let fresh = swap.made.iter().map(|m| m.is_err()).collect();
        let items = swap
            .made
            .into_iter()
            .map(|m| match m {
                Ok(i) => self.items[i].take(),
                Err(c) => T::unwrap(c),
            })
            .collect();
        let old_slots = std::mem::replace(&mut self.slots, swap.slots);
        let old_items = std::mem::replace(&mut self.items, items);
        let replaced = old_slots
            .into_iter()
            .zip(old_items)
            .filter_map(|(s, it)| it.map(|it| (s, it)))
            .collect();
        (replaced, fresh)
    }

    /// The instance `i`, made again first if it is missing; `None` if that fails (logged).
    pub fn get(&mut self, i: usize, host: &HostBox, info: WorkerInfo) -> Option<&mut T> {
        if self.items[i].is_none() {
            self.remake(i, host, info);
        }
        self.items[i].as_mut()
    }

    /// Replaces instance `i` with a new one (after a panic).
    pub fn remake(&mut self, i: usize, host: &HostBox, info: WorkerInfo) {
        self.items[i] = match self.slots[i].instantiate(host, info) {
            Ok(c) => T::unwrap(c),
            Err(e) => {
                log::error!("{} {}: {e}", info.kind.as_str(), info.id);
                None
            }
        };
    }
}

/// What [`Bank::apply`] needs: for each new slot, the index of the kept instance or the new
/// instance.
pub(crate) struct Swap {
    slots: Vec<Slot>,
    made: Vec<Result<usize, Component>>,
}

impl Swap {
    /// How many new instances it holds.
    pub fn created(&self) -> usize {
        self.made.iter().filter(|m| m.is_err()).count()
    }
}

/// The lifecycle hooks of one service thread: `on_worker_start/stop/error` with its kind and id.
#[derive(Debug)]
pub(crate) struct Hooks {
    bank: Bank<LifecycleBox>,
    info: WorkerInfo,
}

impl Hooks {
    /// Creates instances of the hook slots on this thread and runs `on_worker_start`.
    pub fn start(slots: &[Slot], host: &HostBox, info: WorkerInfo) -> Result<Hooks, PluginError> {
        let mut hooks = Hooks {
            bank: Bank::create(slots, host, info)?,
            info,
        };
        hooks.each("on_worker_start", |h, w| h.on_worker_start(w), |_| true);
        Ok(hooks)
    }

    /// `on_worker_stop`, then drops the instances.
    pub fn stop(mut self) {
        self.each("on_worker_stop", |h, w| h.on_worker_stop(w), |_| true);
    }

    /// `on_worker_error` after plugin code on this thread failed.
    pub fn error(&mut self, message: &str) {
        self.each(
            "on_worker_error",
            |h, w| h.on_worker_error(w, message.into()),
            |_| true,
        );
    }

    /// Creates what moving to the hook slots `slots` needs; changes nothing.
    pub fn prepare(&self, slots: &[Slot], host: &HostBox) -> Result<Swap, PluginError> {
        self.bank.prepare(slots, host, self.info)
    }

    /// Moves to a prepared swap: replaced hooks get `on_worker_stop`, new ones
    /// `on_worker_start`.
    pub fn apply(&mut self, swap: Swap) {
        let (replaced, fresh) = self.bank.apply(swap);
        for (slot, mut h) in replaced {
            let inside = calls::enter(slot.call);
            let stopped = h.on_worker_stop(self.info);
            drop(inside);
            drop(h);
            if let RResult::RErr(e) = stopped {
                log::error!("hook on_worker_stop of {} failed: {e}", slot.reference);
            }
        }
        self.each("on_worker_start", |h, w| h.on_worker_start(w), |i| fresh[i]);
    }

    /// Moves to the hook slots `slots`; keeps the old hooks when a new one cannot be created.
    pub fn rebuild(&mut self, slots: &[Slot], host: &HostBox) {
        match self.prepare(slots, host) {
            Ok(swap) => self.apply(swap),
            Err(e) => log::error!(
                "{} {}: keeping the old lifecycle hooks: {e}",
                self.info.kind.as_str(),
                self.info.id
            ),
        }
    }

    fn each(
        &mut self,
        what: &str,
        call: impl Fn(&mut LifecycleBox, WorkerInfo) -> RResult<(), FfiError>,
        which: impl Fn(usize) -> bool,
    ) {
        for (i, hook) in self.bank.items.iter_mut().enumerate() {
            if let (true, Some(h)) = (which(i), hook.as_mut()) {
                let inside = calls::enter(self.bank.slots[i].call);
                let result = call(h, self.info);
                drop(inside);
                if let RResult::RErr(e) = result {
                    log::error!(
                        "{} {}: hook {what} of {} failed: {e}",
                        self.info.kind.as_str(),
                        self.info.id,
                        self.bank.slots[i].reference
                    );
                }
            }
        }
    }
}

/// Reports a failed call into plugin code on a service thread: logs it with the plugin's
/// name and tells the thread's lifecycle hooks.
pub(crate) fn report_failure(
    hooks: Option<&mut Hooks>,
    info: WorkerInfo,
    kind: ComponentKind,
    slot: &Slot,
    error: &FfiError,
) {
    log::error!(
        "plugin {}: {kind} {:?} on {} {} {error}",
        slot.reference.plugin,
        slot.reference.component,
        info.kind.as_str(),
        info.id
    );
    if let Some(h) = hooks {
        h.error(&format!("{kind} {} {error}", slot.reference));
    }
}
