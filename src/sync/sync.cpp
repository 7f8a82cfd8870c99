#include "layerd/sync/sync.hpp"

#include <cassert>

#include "layerd/core/loop.hpp"

namespace layerd::sync {

namespace detail {

void Queue::push(Waiter* w) noexcept {
  w->queue = this;
  w->prev = tail;
  w->next = nullptr;
  if (tail) tail->next = w; else head = w;
  tail = w;
  ++size;
}

void Queue::remove(Waiter* w) noexcept {
  assert(w->queue == this);
  if (w->prev) w->prev->next = w->next; else head = w->next;
  if (w->next) w->next->prev = w->prev; else tail = w->prev;
  w->prev = w->next = nullptr;
  w->queue = nullptr;
  --size;
}

Waiter* Queue::pop() noexcept {
  Waiter* w = head;
  if (w) remove(w);
  return w;
}

bool Waiter::enqueue(Queue& q, core::CancelSource* cancel) noexcept {
  if (!register_with(cancel)) return false;
  q.push(this);
  return true;
}

void Waiter::grant() noexcept {
  unregister();
  granted = true;
  core::Loop::current().post(handle);
}

void Waiter::request_cancel() noexcept {
  // Only a queued waiter is registered: a granted one has left its queue and unregistered.
  if (queue) queue->remove(this);
  core::Loop::current().post(handle);
}

void QueueAwaiter::await_suspend(std::coroutine_handle<> h) noexcept {
  waiter.handle = h;
  if (!waiter.enqueue(queue, cancel)) core::Loop::current().post(h);
}

}  // namespace detail

// --- Semaphore ---------------------------------------------------------------------------------

core::Task<bool> Semaphore::acquire(core::CancelSource* cancel) {
  if (try_acquire()) co_return true;
  detail::Waiter waiter;
  co_return co_await detail::QueueAwaiter{waiters_, waiter, cancel};
}

core::Task<Semaphore::Guard> Semaphore::scoped(core::CancelSource* cancel) {
  // Not `if (co_await ...) co_return ...;`: GCC 12 miscompiles a co_await in an if-condition
  // followed by co_return in both branches (the frame resumes at an invalid suspend point and
  // hits ud2 / SIGILL). Await into a named variable first.
  bool acquired = co_await acquire(cancel);
  co_return acquired ? Guard(this) : Guard();
}

bool Semaphore::try_acquire() noexcept {
  // Queued waiters go first: a newcomer never overtakes them.
  if (count_ == 0 || !waiters_.empty()) return false;
  --count_;
  return true;
}

void Semaphore::release() noexcept {
  if (detail::Waiter* w = waiters_.pop()) {
    w->grant();  // the unit passes straight to the first waiter
  } else {
    ++count_;
  }
}

// --- Event -------------------------------------------------------------------------------------

void Event::set() noexcept {
  set_ = true;
  while (detail::Waiter* w = waiters_.pop()) w->grant();
}

core::Task<bool> Event::wait(core::CancelSource* cancel) {
  if (set_) co_return true;
  detail::Waiter waiter;
  co_return co_await detail::QueueAwaiter{waiters_, waiter, cancel};
}

// --- KeyedMutex --------------------------------------------------------------------------------

KeyedMutex::~KeyedMutex() { assert(entries_.empty() && "KeyedMutex destroyed while in use"); }

core::Task<KeyedMutex::Guard> KeyedMutex::lock(std::string key, core::CancelSource* cancel) {
  auto [it, inserted] = entries_.try_emplace(key);
  if (inserted) co_return Guard(this, std::move(key));
  if (cancel && cancel->cancelled()) co_return Guard();
  detail::Waiter waiter;
  // The entry's address is stable (unordered_map nodes do not move) while we are queued in it.
  bool granted = co_await detail::QueueAwaiter{it->second.waiters, waiter, cancel};
  if (!granted) co_return Guard();
  co_return Guard(this, std::move(key));
}

KeyedMutex::Guard KeyedMutex::try_lock(std::string_view key) {
  auto [it, inserted] = entries_.try_emplace(std::string(key));
  if (!inserted) return Guard();
  return Guard(this, it->first);
}

bool KeyedMutex::is_locked(std::string_view key) const {
  return entries_.find(std::string(key)) != entries_.end();
}

void KeyedMutex::unlock(const std::string& key) noexcept {
  auto it = entries_.find(key);
  assert(it != entries_.end() && "unlock of a key that is not held");
  if (it == entries_.end()) return;
  if (detail::Waiter* w = it->second.waiters.pop()) {
    w->grant();  // FIFO hand-off: the key stays held, now by the first waiter
  } else {
    entries_.erase(it);
  }
}

}  // namespace layerd::sync
