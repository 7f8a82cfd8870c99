// The loop: one io_uring ring driven by one thread. Operations put SQEs on the ring in
// await_suspend; completions are first collected into a ready queue and the waiting coroutines
// are resumed from that queue, never from inside the CQE walk. Blocking work that the ring cannot
// do (directory walks, recursive removal) goes to a small worker pool through offload(), and its
// completion comes back through an eventfd read on the ring.
#pragma once

#include <liburing.h>

#include <condition_variable>
#include <coroutine>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "layerd/core/task.hpp"
#include "layerd/sys/fd.hpp"

namespace layerd::core {

// Something the ring completes: every SQE's user_data is a Completion* or kIgnoredCompletion.
class Completion {
 public:
  // Runs inside the CQE walk: must only record the result and post a handle, never resume.
  virtual void complete(int result, std::uint32_t cqe_flags) noexcept = 0;

 protected:
  ~Completion() = default;
};

// user_data for SQEs whose CQE carries nothing we need (cancel requests, linked timeouts).
// Never a valid pointer: Completion objects are at least 8-byte aligned.
inline constexpr std::uint64_t kIgnoredCompletion = 1;

struct LoopFeatures {
  bool single_issuer = false;
  bool defer_taskrun = false;
  bool ring_waitid = false;  // IORING_OP_WAITID (Linux 6.7)
};

struct LoopOptions {
  unsigned sq_entries = 256;
  // Large enough that bursts of completions (a mount storm, thousands of connections) never
  // overflow; the kernel would buffer overflowing CQEs anyway (IORING_FEAT_NODROP).
  unsigned cq_entries = 16384;
  bool try_single_issuer = true;
  bool try_defer_taskrun = true;
  bool try_ring_waitid = true;
  unsigned offload_threads = 2;
  // Niceness the offload workers set for themselves (unset: inherit the loop thread's). A daemon
  // that raises its loop thread's priority keeps its workers, and the children they spawn, at
  // the process's own.
  std::optional<int> worker_nice;
};

class Loop {
 public:
  explicit Loop(LoopOptions options = {});
  ~Loop();
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  // The loop of the calling thread. Exactly one per thread.
  static Loop& current() noexcept;
  static Loop* current_or_null() noexcept;

  [[nodiscard]] const LoopFeatures& features() const noexcept { return features_; }

  // A free SQE. When the submission queue is full it is submitted first: never null.
  io_uring_sqe* get_sqe();
  // Ensures `n` SQEs can be taken in a row without an intervening submit (linked chains).
  void reserve_sqes(unsigned n);

  // Queues `handle` to be resumed by the loop.
  void post(std::coroutine_handle<> handle) { ready_.push_back(handle); }

  // Runs the loop until `task` finishes; returns its result (rethrows its exception).
  template <typename T>
  T block_on(Task<T> task) {
    post(task.start_with(std::noop_coroutine()));
    for (;;) {
      run_ready();
      if (task.done()) break;
      poll_completions();
    }
    return task.result();
  }

  // One round: resumes what is ready, then polls for completions.
  void run_once() {
    run_ready();
    poll_completions();
  }
  // Submits queued SQEs, waits for at least one completion if nothing is ready, and moves
  // completions into the ready queue.
  void poll_completions();

  // Runs `job` on a worker thread; `done` is completed on the loop when it has run.
  void offload(std::function<void()> job, Completion* done);

  // Completions that free themselves on their CQE (an orphaned Deadline timer): the loop's
  // destructor drains them so nothing is leaked at shutdown.
  void detached_started() noexcept { ++detached_outstanding_; }
  void detached_finished() noexcept { --detached_outstanding_; }

  // Counters for tests and metrics.
  [[nodiscard]] std::uint64_t completions_reaped() const noexcept { return completions_reaped_; }
  [[nodiscard]] std::size_t ready_count() const noexcept { return ready_.size(); }

 private:
  class OffloadWake;
  void run_ready();
  void reap();
 private:
  void submit(unsigned wait_for);
  void arm_offload_wake();
  void worker_main();
  void on_offload_wake() noexcept;

  io_uring ring_{};
  LoopFeatures features_;
  std::deque<std::coroutine_handle<>> ready_;
  std::uint64_t completions_reaped_ = 0;
  std::size_t detached_outstanding_ = 0;

  // Offload pool.
  unsigned offload_threads_ = 0;
  std::optional<int> worker_nice_;
  std::vector<std::thread> workers_;
  std::mutex offload_mutex_;
  std::condition_variable offload_cv_;
  std::deque<std::pair<std::function<void()>, Completion*>> offload_jobs_;
  std::vector<Completion*> offload_done_;
  bool stopping_ = false;
  std::size_t offloads_outstanding_ = 0;
  sys::UniqueFd offload_eventfd_;
  std::uint64_t offload_eventfd_value_ = 0;
  bool offload_wake_armed_ = false;
  OffloadWake* offload_wake_ = nullptr;
};

}  // namespace layerd::core
