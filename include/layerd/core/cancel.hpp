// Cooperative cancellation. A CancelSource is handed to awaitables (ring operations, lock and
// semaphore waiters, child waits). cancel() asks each registered waiter to stop; a waiter always
// finishes through its normal completion path (for a ring operation: its own CQE, with
// -ECANCELED or its real result if it won the race), so no frame is freed while the kernel still
// holds a pointer into it.
#pragma once

#include <cassert>

namespace layerd::core {

class CancelSource;

// A waiter that can be asked to stop. Registered with at most one CancelSource at a time.
class Cancellable {
 public:
  Cancellable() = default;
  Cancellable(const Cancellable&) = delete;
  Cancellable& operator=(const Cancellable&) = delete;

 protected:
  ~Cancellable() { assert(source_ == nullptr && "cancellable destroyed while registered"); }
  // Called at most once, on the loop thread, while registered. Must not resume anything inline.
  virtual void request_cancel() noexcept = 0;

  // Registers with `source` (may be null). Returns false, without registering, if the source is
  // already cancelled: the caller then completes at once with -ECANCELED.
  bool register_with(CancelSource* source) noexcept;
  void unregister() noexcept;

 private:
  friend class CancelSource;
  CancelSource* source_ = nullptr;
  Cancellable* prev_ = nullptr;
  Cancellable* next_ = nullptr;
};

class CancelSource {
 public:
  CancelSource() = default;
  CancelSource(const CancelSource&) = delete;
  CancelSource& operator=(const CancelSource&) = delete;
  ~CancelSource() { assert(head_ == nullptr && "CancelSource destroyed with waiters"); }

  // Cancels every registered waiter and every waiter that registers later.
  void cancel() noexcept {
    cancelled_ = true;
    while (Cancellable* c = head_) {
      detach(c);
      c->request_cancel();
    }
  }
  [[nodiscard]] bool cancelled() const noexcept { return cancelled_; }

 private:
  friend class Cancellable;
  void attach(Cancellable* c) noexcept {
    c->source_ = this;
    c->prev_ = nullptr;
    c->next_ = head_;
    if (head_) head_->prev_ = c;
    head_ = c;
  }
  void detach(Cancellable* c) noexcept {
    if (c->prev_) c->prev_->next_ = c->next_; else head_ = c->next_;
    if (c->next_) c->next_->prev_ = c->prev_;
    c->source_ = nullptr;
    c->prev_ = c->next_ = nullptr;
  }

  Cancellable* head_ = nullptr;
  bool cancelled_ = false;
};

inline bool Cancellable::register_with(CancelSource* source) noexcept {
  if (source == nullptr) return true;
  if (source->cancelled()) return false;
  source->attach(this);
  return true;
}

inline void Cancellable::unregister() noexcept {
  if (source_) source_->detach(this);
}

}  // namespace layerd::core
