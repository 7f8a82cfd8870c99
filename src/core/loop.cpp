#include "layerd/core/loop.hpp"

#include <sys/eventfd.h>
#include <sys/resource.h>

#include <cassert>
#include <cerrno>

#include "layerd/sys/error.hpp"

namespace layerd::core {

namespace {
thread_local Loop* tls_current_loop = nullptr;
// IORING_OP_WAITID from Linux 6.7 uapi; Debian 12's liburing 2.3 headers predate it.
constexpr int kOpWaitid = 50;
}  // namespace

class Loop::OffloadWake final : public Completion {
 public:
  explicit OffloadWake(Loop& loop) : loop_(loop) {}
  void complete(int, std::uint32_t) noexcept override { loop_.on_offload_wake(); }

 private:
  Loop& loop_;
};

Loop::Loop(LoopOptions options) {
  assert(tls_current_loop == nullptr && "one Loop per thread");
  io_uring_params params{};
  params.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
  params.cq_entries = options.cq_entries;
  if (options.try_single_issuer) params.flags |= IORING_SETUP_SINGLE_ISSUER;
  if (options.try_single_issuer && options.try_defer_taskrun)
    params.flags |= IORING_SETUP_DEFER_TASKRUN;
  int res = io_uring_queue_init_params(options.sq_entries, &ring_, &params);
  // Older kernels reject flags they do not know with EINVAL: drop them one at a time.
  for (unsigned drop : {IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_SINGLE_ISSUER,
                        IORING_SETUP_SUBMIT_ALL}) {
    if (res != -EINVAL) break;
    params = io_uring_params{.flags = params.flags & ~drop};
    params.cq_entries = options.cq_entries;
    res = io_uring_queue_init_params(options.sq_entries, &ring_, &params);
  }
  check(res, "io_uring_queue_init");
  features_.single_issuer = params.flags & IORING_SETUP_SINGLE_ISSUER;
  features_.defer_taskrun = params.flags & IORING_SETUP_DEFER_TASKRUN;
  if (options.try_ring_waitid) {
    if (io_uring_probe* probe = io_uring_get_probe_ring(&ring_)) {
      features_.ring_waitid = probe->last_op >= kOpWaitid &&
                              (probe->ops[kOpWaitid].flags & IO_URING_OP_SUPPORTED);
      io_uring_free_probe(probe);
    }
  }
  offload_threads_ = options.offload_threads == 0 ? 1 : options.offload_threads;
  worker_nice_ = options.worker_nice;
  offload_wake_ = new OffloadWake(*this);
  tls_current_loop = this;
}

Loop::~Loop() {
  while (detached_outstanding_ > 0) run_once();
  {
    std::lock_guard lock(offload_mutex_);
    stopping_ = true;
  }
  offload_cv_.notify_all();
  for (auto& worker : workers_) worker.join();
  // Destroying the ring cancels what is still in flight (only the offload eventfd read should
  // be, when the loop is torn down between offloads).
  io_uring_queue_exit(&ring_);
  delete offload_wake_;
  tls_current_loop = nullptr;
}

Loop& Loop::current() noexcept {
  assert(tls_current_loop && "no Loop on this thread");
  return *tls_current_loop;
}

Loop* Loop::current_or_null() noexcept { return tls_current_loop; }

io_uring_sqe* Loop::get_sqe() {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  while (sqe == nullptr) {
    submit(0);
    sqe = io_uring_get_sqe(&ring_);
  }
  return sqe;
}

void Loop::reserve_sqes(unsigned n) {
  if (io_uring_sq_space_left(&ring_) < n) submit(0);
}

void Loop::submit(unsigned wait_for) {
  for (;;) {
    int res = wait_for > 0 ? io_uring_submit_and_wait(&ring_, wait_for)
                           : io_uring_submit_and_get_events(&ring_);
    if (res >= 0 || res == -EINTR || res == -ETIME) return;
    if (res == -EBUSY || res == -EAGAIN) {
      // The completion queue is backed up: make room by collecting completions, then retry
      // without waiting (what we collected is now ready to run).
      reap();
      wait_for = 0;
      continue;
    }
    check(res, "io_uring_enter");
  }
}

void Loop::reap() {
  // Each CQE is consumed (the head advanced) before its completion runs: a completion may take
  // an SQE, taking one may submit, and a submit that finds the CQ backed up reaps again. That
  // nested walk must start after this CQE, never hand it out twice.
  while (io_uring_cq_ready(&ring_) > 0) {
    io_uring_cqe* cqe = nullptr;
    if (io_uring_peek_cqe(&ring_, &cqe) != 0 || cqe == nullptr) break;
    const std::uint64_t user_data = cqe->user_data;
    const int result = cqe->res;
    const std::uint32_t flags = cqe->flags;
    io_uring_cqe_seen(&ring_, cqe);
    ++completions_reaped_;
    if (user_data != kIgnoredCompletion) {
      auto* completion = reinterpret_cast<Completion*>(static_cast<std::uintptr_t>(user_data));
      completion->complete(result, flags);
    }
  }
}

void Loop::run_ready() {
  // Only what is ready now: handles posted while running wait for the next round, so a busy
  // coroutine cannot starve I/O.
  for (std::size_t n = ready_.size(); n > 0 && !ready_.empty(); --n) {
    auto handle = ready_.front();
    ready_.pop_front();
    detail::resume_and_drain(handle);
  }
}

void Loop::poll_completions() {
  submit(ready_.empty() ? 1 : 0);
  reap();
  if (offloads_outstanding_ > 0) arm_offload_wake();
}

void Loop::offload(std::function<void()> job, Completion* done) {
  if (workers_.empty()) {
    sys::UniqueFd efd(::eventfd(0, EFD_CLOEXEC));
    if (!efd) throw Error(errno, "eventfd for the offload pool");
    offload_eventfd_ = std::move(efd);
    for (unsigned i = 0; i < offload_threads_; ++i) workers_.emplace_back([this] { worker_main(); });
  }
  {
    std::lock_guard lock(offload_mutex_);
    offload_jobs_.emplace_back(std::move(job), done);
  }
  ++offloads_outstanding_;
  offload_cv_.notify_one();
  arm_offload_wake();
}

void Loop::arm_offload_wake() {
  if (offload_wake_armed_) return;
  io_uring_sqe* sqe = get_sqe();
  io_uring_prep_read(sqe, offload_eventfd_.get(), &offload_eventfd_value_,
                     sizeof offload_eventfd_value_, 0);
  io_uring_sqe_set_data(sqe, static_cast<Completion*>(offload_wake_));
  offload_wake_armed_ = true;
}

void Loop::on_offload_wake() noexcept {
  offload_wake_armed_ = false;
  std::vector<Completion*> done;
  {
    std::lock_guard lock(offload_mutex_);
    done.swap(offload_done_);
  }
  offloads_outstanding_ -= done.size();
  for (Completion* completion : done) completion->complete(0, 0);
  // Re-armed by run_once after the CQE walk: taking an SQE here could submit, and submitting
  // can reap, which must not nest inside the walk.
}

void Loop::worker_main() {
  // PRIO_PROCESS with a thread id sets that thread's niceness only. A failure leaves the
  // inherited one, which is only a scheduling preference.
  if (worker_nice_) (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), *worker_nice_);
  for (;;) {
    std::pair<std::function<void()>, Completion*> job;
    {
      std::unique_lock lock(offload_mutex_);
      offload_cv_.wait(lock, [this] { return stopping_ || !offload_jobs_.empty(); });
      if (offload_jobs_.empty()) return;
      job = std::move(offload_jobs_.front());
      offload_jobs_.pop_front();
    }
    job.first();
    {
      std::lock_guard lock(offload_mutex_);
      offload_done_.push_back(job.second);
    }
    std::uint64_t one = 1;
    // The eventfd counter cannot overflow in practice; a failed write would only delay wake-up.
    (void)!::write(offload_eventfd_.get(), &one, sizeof one);
  }
}

}  // namespace layerd::core
