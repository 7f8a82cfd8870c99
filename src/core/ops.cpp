#include "layerd/core/ops.hpp"

#include <cerrno>

namespace layerd::core {

void RingOp::start(std::coroutine_handle<> waiter) {
  waiter_ = waiter;
  cancel_requested_ = false;
  Loop& loop = Loop::current();
  if (!register_with(cancel_)) {
    // Cancelled before it started: nothing reaches the kernel. Resumed through the ready queue
    // like every completion.
    result_ = -ECANCELED;
    loop.post(waiter);
    return;
  }
  if (timeout_) loop.reserve_sqes(2);
  io_uring_sqe* sqe = loop.get_sqe();
  prepare(sqe);
  io_uring_sqe_set_data(sqe, static_cast<Completion*>(this));
  in_flight_ = true;
  if (timeout_) {
    sqe->flags |= IOSQE_IO_LINK;
    io_uring_sqe* link = loop.get_sqe();
    io_uring_prep_link_timeout(link, &*timeout_, 0);
    io_uring_sqe_set_data64(link, kIgnoredCompletion);
  }
}

void RingOp::complete(int result, std::uint32_t) noexcept {
  in_flight_ = false;
  unregister();
  // A request already running in an io-wq worker (a connect blocked on a full backlog) is
  // interrupted by a cancel or by its linked timeout and completes with -EINTR; nothing else
  // signals io-wq workers, so that result means "cancelled" and is reported as such.
  if (result == -EINTR && (cancel_requested_ || timeout_)) result = -ECANCELED;
  result_ = map_result(result);
  Loop::current().post(waiter_);
}

void RingOp::request_cancel() noexcept {
  if (!in_flight_) return;
  io_uring_sqe* sqe;
  try {
    sqe = Loop::current().get_sqe();
  } catch (...) {
    // The ring is unusable; the operation will still complete (or the loop is going away).
    return;
  }
  io_uring_prep_cancel(sqe, static_cast<Completion*>(this), 0);
  io_uring_sqe_set_data64(sqe, kIgnoredCompletion);
  cancel_requested_ = true;
}

struct Deadline::State final : Completion {
  State(CancelSource* s, __kernel_timespec t) : source(s), ts(t) {}
  CancelSource* source;
  __kernel_timespec ts;
  bool fired = false;
  bool done = false;      // the timer's CQE arrived
  bool orphaned = false;  // the Deadline is gone: free on the CQE
  void complete(int result, std::uint32_t) noexcept override {
    done = true;
    if (result == -ETIME && source) {
      fired = true;
      source->cancel();
    }
    if (orphaned) {
      Loop::current().detached_finished();
      delete this;
    }
  }
};

Deadline::Deadline(CancelSource& source, std::chrono::nanoseconds d)
    : state_(new State(&source, to_timespec(d))) {
  io_uring_sqe* sqe = Loop::current().get_sqe();
  io_uring_prep_timeout(sqe, &state_->ts, 0, 0);
  io_uring_sqe_set_data(sqe, static_cast<Completion*>(state_));
}

bool Deadline::expired() const noexcept { return state_ && state_->fired; }

void Deadline::disarm() noexcept {
  if (!state_) return;
  State* state = std::exchange(state_, nullptr);
  state->source = nullptr;
  if (state->done) {
    delete state;
    return;
  }
  state->orphaned = true;
  Loop::current().detached_started();
  try {
    io_uring_sqe* sqe = Loop::current().get_sqe();
    io_uring_prep_timeout_remove(sqe, reinterpret_cast<std::uintptr_t>(
                                          static_cast<Completion*>(state)), 0);
    io_uring_sqe_set_data64(sqe, kIgnoredCompletion);
  } catch (...) {
    // The timer will still fire and free its state; it cancels nothing now.
  }
}

}  // namespace layerd::core
