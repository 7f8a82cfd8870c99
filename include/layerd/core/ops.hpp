// Awaitable ring operations. Each is a pinned object living in the awaiting coroutine's frame
// (the co_await temporary); its address is the SQE's user_data. co_await yields the CQE result:
// >= 0 on success, a negative errno on failure (-ECANCELED when cancelled before it finished).
//
//   int n = co_await core::read(fd, buf, len, offset);
//   int n = co_await core::recv(fd, buf, len).cancel_on(source).timeout(5s);
#pragma once

#include <fcntl.h>
#include <linux/openat2.h>
#include <liburing.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cassert>
#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <type_traits>
#include <utility>

#include "layerd/core/cancel.hpp"
#include "layerd/core/loop.hpp"
#include "layerd/core/task.hpp"

namespace layerd::core {

using Clock = std::chrono::steady_clock;

inline __kernel_timespec to_timespec(std::chrono::nanoseconds d) {
  if (d.count() < 0) d = std::chrono::nanoseconds(0);
  return __kernel_timespec{.tv_sec = static_cast<long long>(d.count() / 1'000'000'000),
                           .tv_nsec = static_cast<long long>(d.count() % 1'000'000'000)};
}

// Base of every ring operation. Derived classes fill the SQE in prepare().
class RingOp : public Completion, public Cancellable {
 public:
  RingOp() = default;
  RingOp(const RingOp&) = delete;
  RingOp& operator=(const RingOp&) = delete;

  // The awaiter is a pointer to this pinned object: the operation itself is never copied (GCC 12
  // would otherwise copy an xvalue or lvalue awaitable into the frame).
  struct Awaiter {
    RingOp* op;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> waiter) { op->start(waiter); }
    int await_resume() const noexcept { return op->result_; }
  };
  Awaiter operator co_await() & noexcept { return Awaiter{this}; }
  Awaiter operator co_await() && noexcept { return Awaiter{this}; }

  void complete(int result, std::uint32_t cqe_flags) noexcept override;

  // True from submission until the operation's own CQE has been reaped: the kernel may still
  // write into the object (buffers, the SQE's user_data) while it is.
  [[nodiscard]] bool in_flight() const noexcept { return in_flight_; }

 protected:
  ~RingOp() { assert(!in_flight_ && "ring operation destroyed while in flight"); }
  virtual void prepare(io_uring_sqe* sqe) = 0;
  // Lets an operation map its raw result (a timer's -ETIME is success for sleep()).
  virtual int map_result(int result) const noexcept { return result; }
  void request_cancel() noexcept override;
  void start(std::coroutine_handle<> waiter);

  CancelSource* cancel_ = nullptr;
  std::optional<__kernel_timespec> timeout_;

 private:
  std::coroutine_handle<> waiter_;
  int result_ = 0;
  bool in_flight_ = false;
  // Set when this operation asked the kernel to cancel it (see complete(): -EINTR then means
  // "cancelled").
  bool cancel_requested_ = false;
};

// Chainable options: `cancel_on` registers with a CancelSource; `timeout` links an
// IORING_OP_LINK_TIMEOUT so the operation fails with -ECANCELED when it does not finish in time.
template <typename Derived>
class Op : public RingOp {
 public:
  Derived& cancel_on(CancelSource& source) {
    cancel_ = &source;
    return static_cast<Derived&>(*this);
  }
  Derived& cancel_on(CancelSource* source) {
    cancel_ = source;
    return static_cast<Derived&>(*this);
  }
  Derived& timeout(std::chrono::nanoseconds d) {
    timeout_ = to_timespec(d);
    return static_cast<Derived&>(*this);
  }
};

// An operation whose SQE is filled by a callable: for the many one-line preparations.
template <typename Prep>
class PrepOp final : public Op<PrepOp<Prep>> {
 public:
  explicit PrepOp(Prep prep) : prep_(std::move(prep)) {}

 private:
  void prepare(io_uring_sqe* sqe) override { prep_(sqe); }
  Prep prep_;
};

template <typename Prep>
PrepOp<Prep> make_op(Prep prep) {
  return PrepOp<Prep>(std::move(prep));
}

inline auto nop() {
  return make_op([](io_uring_sqe* sqe) { io_uring_prep_nop(sqe); });
}
inline auto read(int fd, void* buf, unsigned len, std::uint64_t offset = -1ULL) {
  return make_op([=](io_uring_sqe* sqe) { io_uring_prep_read(sqe, fd, buf, len, offset); });
}
inline auto write(int fd, const void* buf, unsigned len, std::uint64_t offset = -1ULL) {
  return make_op([=](io_uring_sqe* sqe) { io_uring_prep_write(sqe, fd, buf, len, offset); });
}
inline auto recv(int fd, void* buf, std::size_t len, int flags = 0) {
  return make_op([=](io_uring_sqe* sqe) { io_uring_prep_recv(sqe, fd, buf, len, flags); });
}
// MSG_NOSIGNAL always: a peer that went away is an EPIPE result, never a SIGPIPE.
inline auto send(int fd, const void* buf, std::size_t len, int flags = 0) {
  return make_op([=](io_uring_sqe* sqe) {
    io_uring_prep_send(sqe, fd, buf, len, flags | MSG_NOSIGNAL);
  });
}
inline auto accept(int fd, sockaddr* addr = nullptr, socklen_t* addrlen = nullptr) {
  return make_op([=](io_uring_sqe* sqe) {
    io_uring_prep_accept(sqe, fd, addr, addrlen, SOCK_CLOEXEC);
  });
}
inline auto connect(int fd, const sockaddr* addr, socklen_t addrlen) {
  return make_op([=](io_uring_sqe* sqe) { io_uring_prep_connect(sqe, fd, addr, addrlen); });
}
// Resolves to the returned poll mask.
inline auto poll(int fd, unsigned mask) {
  return make_op([=](io_uring_sqe* sqe) { io_uring_prep_poll_add(sqe, fd, mask); });
}
inline auto openat(int dirfd, const char* path, int flags, mode_t mode = 0) {
  return make_op([=](io_uring_sqe* sqe) {
    io_uring_prep_openat(sqe, dirfd, path, flags | O_CLOEXEC, mode);
  });
}
// `how` must outlive the operation (it is read when the kernel runs the request).
inline auto openat2(int dirfd, const char* path, open_how* how) {
  how->flags |= O_CLOEXEC;
  return make_op([=](io_uring_sqe* sqe) { io_uring_prep_openat2(sqe, dirfd, path, how); });
}
inline auto close(int fd) {
  return make_op([=](io_uring_sqe* sqe) { io_uring_prep_close(sqe, fd); });
}
inline auto statx(int dirfd, const char* path, int flags, unsigned mask, struct statx* out) {
  return make_op([=](io_uring_sqe* sqe) {
    io_uring_prep_statx(sqe, dirfd, path, flags, mask, out);
  });
}
inline auto fsync(int fd, unsigned flags = 0) {
  return make_op([=](io_uring_sqe* sqe) { io_uring_prep_fsync(sqe, fd, flags); });
}
inline auto mkdirat(int dirfd, const char* path, mode_t mode) {
  return make_op([=](io_uring_sqe* sqe) { io_uring_prep_mkdirat(sqe, dirfd, path, mode); });
}
inline auto symlinkat(const char* target, int dirfd, const char* linkpath) {
  return make_op([=](io_uring_sqe* sqe) {
    io_uring_prep_symlinkat(sqe, target, dirfd, linkpath);
  });
}
inline auto linkat(int olddirfd, const char* oldpath, int newdirfd, const char* newpath,
                   int flags = 0) {
  return make_op([=](io_uring_sqe* sqe) {
    io_uring_prep_linkat(sqe, olddirfd, oldpath, newdirfd, newpath, flags);
  });
}
inline auto renameat(int olddirfd, const char* oldpath, int newdirfd, const char* newpath,
                     unsigned flags = 0) {
  return make_op([=](io_uring_sqe* sqe) {
    io_uring_prep_renameat(sqe, olddirfd, oldpath, newdirfd, newpath, flags);
  });
}
inline auto unlinkat(int dirfd, const char* path, int flags = 0) {
  return make_op([=](io_uring_sqe* sqe) { io_uring_prep_unlinkat(sqe, dirfd, path, flags); });
}

// Waits for a child to exit, reaping it: IORING_OP_WAITID on `pidfd` (Linux 6.7). Check
// Loop::features().ring_waitid first; proc/ falls back to poll + waitid(P_PIDFD).
#ifndef P_PIDFD
#define P_PIDFD 3
#endif
inline auto waitid(int pidfd, siginfo_t* info) {
  return make_op([=](io_uring_sqe* sqe) {
    constexpr int kOpWaitid = 50;
    io_uring_prep_rw(kOpWaitid, sqe, pidfd, nullptr, P_PIDFD, 0);
    sqe->rw_flags = 0;           // waitid_flags
    sqe->file_index = WEXITED;   // waitid options
    sqe->addr2 = reinterpret_cast<std::uintptr_t>(info);
  });
}

// Sleeps for `d`; resolves to 0 when the time has passed, -ECANCELED when cancelled.
class SleepOp final : public Op<SleepOp> {
 public:
  explicit SleepOp(std::chrono::nanoseconds d) : ts_(to_timespec(d)) {}

 private:
  void prepare(io_uring_sqe* sqe) override { io_uring_prep_timeout(sqe, &ts_, 0, 0); }
  int map_result(int result) const noexcept override { return result == -ETIME ? 0 : result; }
  __kernel_timespec ts_;
};
inline SleepOp sleep(std::chrono::nanoseconds d) { return SleepOp(d); }

// Lets other ready coroutines run, then resumes.
struct Yield {
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) const { Loop::current().post(h); }
  void await_resume() const noexcept {}
};
inline Yield yield() { return {}; }

// Cancels `source` when `d` has passed, unless disarmed first. The timer's state lives on the
// heap and frees itself when its last CQE arrives, so disarming never waits.
class Deadline {
 public:
  Deadline(CancelSource& source, std::chrono::nanoseconds d);
  ~Deadline() { disarm(); }
  Deadline(const Deadline&) = delete;
  Deadline& operator=(const Deadline&) = delete;
  void disarm() noexcept;
  [[nodiscard]] bool expired() const noexcept;

 private:
  struct State;
  State* state_;
};

// Runs `fn` (a blocking function) on the loop's worker pool and resumes with its result.
// For work the ring cannot do: directory walks, recursive removal.
template <typename Fn>
class OffloadOp final : public Completion {
 public:
  using Result = std::invoke_result_t<Fn&>;
  explicit OffloadOp(Fn fn) : fn_(std::move(fn)) {}
  OffloadOp(const OffloadOp&) = delete;
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) {
    waiter_ = h;
    Loop::current().offload(
        [this] {
          try {
            if constexpr (std::is_void_v<Result>) {
              fn_();
            } else {
              result_.emplace(fn_());
            }
          } catch (...) {
            error_ = std::current_exception();
          }
        },
        this);
  }
  Result await_resume() {
    if (error_) std::rethrow_exception(error_);
    if constexpr (!std::is_void_v<Result>) return std::move(*result_);
  }
  void complete(int, std::uint32_t) noexcept override { Loop::current().post(waiter_); }

 private:
  Fn fn_;
  std::coroutine_handle<> waiter_;
  std::conditional_t<std::is_void_v<Result>, char, std::optional<Result>> result_{};
  std::exception_ptr error_;
};
template <typename Fn>
OffloadOp<Fn> offload(Fn fn) {
  return OffloadOp<Fn>(std::move(fn));
}

}  // namespace layerd::core
