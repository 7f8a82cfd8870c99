// Coroutine synchronisation on the loop thread: Semaphore, Event and KeyedMutex. Waiters queue in
// FIFO order; a release hands ownership straight to the first waiter (no barging) and posts it to
// the ready queue, never resuming it inline. Each wait can be cancelled through a CancelSource
// while queued; it then resolves to "not acquired".
#pragma once

#include <coroutine>
#include <cstddef>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "layerd/core/cancel.hpp"
#include "layerd/core/task.hpp"

namespace layerd::sync {

namespace detail {

// A queued waiter, linked into its primitive's FIFO.
class Waiter : public core::Cancellable {
 public:
  Waiter() = default;
  ~Waiter() { unregister(); }
  std::coroutine_handle<> handle;
  bool granted = false;
  Waiter* prev = nullptr;
  Waiter* next = nullptr;
  struct Queue* queue = nullptr;

  // Queues this waiter unless `cancel` has fired; false (not queued) if it has.
  bool enqueue(struct Queue& q, core::CancelSource* cancel) noexcept;
  // Called by the primitive after removing the waiter from its queue: hands it ownership and
  // posts it to the loop.
  void grant() noexcept;

 protected:
  void request_cancel() noexcept override;
};

struct Queue {
  Waiter* head = nullptr;
  Waiter* tail = nullptr;
  std::size_t size = 0;
  void push(Waiter* w) noexcept;
  void remove(Waiter* w) noexcept;
  Waiter* pop() noexcept;
  [[nodiscard]] bool empty() const noexcept { return head == nullptr; }
};

// Awaits in `queue` with `waiter`; resolves to waiter.granted.
struct QueueAwaiter {
  Queue& queue;
  Waiter& waiter;
  core::CancelSource* cancel;
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) noexcept;
  bool await_resume() const noexcept { return waiter.granted; }
};

}  // namespace detail

class Semaphore {
 public:
  explicit Semaphore(std::size_t count) : count_(count) {}
  Semaphore(const Semaphore&) = delete;
  Semaphore& operator=(const Semaphore&) = delete;

  class Guard {
   public:
    Guard() = default;
    explicit Guard(Semaphore* s) : sem_(s) {}
    Guard(Guard&& o) noexcept : sem_(std::exchange(o.sem_, nullptr)) {}
    Guard& operator=(Guard&& o) noexcept {
      if (this != &o) {
        release();
        sem_ = std::exchange(o.sem_, nullptr);
      }
      return *this;
    }
    ~Guard() { release(); }
    explicit operator bool() const noexcept { return sem_ != nullptr; }
    void release() noexcept {
      if (sem_) std::exchange(sem_, nullptr)->release();
    }

   private:
    Semaphore* sem_ = nullptr;
  };

  // Resolves to true once a unit is held, false if cancelled while queued.
  core::Task<bool> acquire(core::CancelSource* cancel = nullptr);
  // acquire() wrapped in a guard that releases on destruction (empty guard if cancelled).
  core::Task<Guard> scoped(core::CancelSource* cancel = nullptr);
  bool try_acquire() noexcept;
  void release() noexcept;

  [[nodiscard]] std::size_t available() const noexcept { return count_; }
  [[nodiscard]] std::size_t waiting() const noexcept { return waiters_.size; }

 private:
  std::size_t count_;
  detail::Queue waiters_;
};

class Event {
 public:
  Event() = default;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  // Wakes every waiter; later waits return at once until reset().
  void set() noexcept;
  void reset() noexcept { set_ = false; }
  [[nodiscard]] bool is_set() const noexcept { return set_; }
  // Resolves to true once set, false if cancelled first.
  core::Task<bool> wait(core::CancelSource* cancel = nullptr);

 private:
  bool set_ = false;
  detail::Queue waiters_;
};

// One FIFO mutex per key, created on first use and freed when nobody holds or awaits it.
class KeyedMutex {
  struct Entry;

 public:
  KeyedMutex() = default;
  KeyedMutex(const KeyedMutex&) = delete;
  KeyedMutex& operator=(const KeyedMutex&) = delete;
  ~KeyedMutex();

  class Guard {
   public:
    Guard() = default;
    Guard(KeyedMutex* m, std::string key) : mutex_(m), key_(std::move(key)) {}
    Guard(Guard&& o) noexcept
        : mutex_(std::exchange(o.mutex_, nullptr)), key_(std::move(o.key_)) {}
    Guard& operator=(Guard&& o) noexcept {
      if (this != &o) {
        unlock();
        mutex_ = std::exchange(o.mutex_, nullptr);
        key_ = std::move(o.key_);
      }
      return *this;
    }
    ~Guard() { unlock(); }
    explicit operator bool() const noexcept { return mutex_ != nullptr; }
    [[nodiscard]] const std::string& key() const noexcept { return key_; }
    void unlock() noexcept {
      if (mutex_) std::exchange(mutex_, nullptr)->unlock(key_);
    }

   private:
    KeyedMutex* mutex_ = nullptr;
    std::string key_;
  };

  // Resolves to a held guard, or an empty one if cancelled while queued.
  core::Task<Guard> lock(std::string key, core::CancelSource* cancel = nullptr);
  Guard try_lock(std::string_view key);

  [[nodiscard]] bool is_locked(std::string_view key) const;
  // Keys with an entry (held or awaited): zero when idle.
  [[nodiscard]] std::size_t entries() const noexcept { return entries_.size(); }

 private:
  struct Entry {
    detail::Queue waiters;
  };
  void unlock(const std::string& key) noexcept;

  // An entry exists exactly while its key is held.
  std::unordered_map<std::string, Entry> entries_;
};

}  // namespace layerd::sync
