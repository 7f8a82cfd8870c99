// Child processes held by a pidfd and awaited on the io_uring loop.
//
// A Child is spawned with posix_spawn and pinned with pidfd_open right away: our own unreaped
// child's pid cannot be reused before we reap it, so the pidfd refers to exactly that process.
// Exit is awaited with IORING_OP_WAITID where the kernel has it, else by polling the pidfd on the
// ring and reaping with waitid(P_PIDFD, WNOHANG). Only our own children are ever reaped: nothing
// here calls waitpid(-1) or waitid(P_ALL), so other parts can own children too.
//
//   proc::Child child = proc::Child::spawn({.argv = {"fuse-overlayfs", "-f", ...}});
//   std::optional<proc::ExitStatus> status = co_await child.wait(&cancel);
//
// Requirements on the process: SIGCHLD must not be ignored (SIG_IGN or SA_NOCLDWAIT makes the
// kernel reap children itself and waitid fail with ECHILD).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "layerd/core/cancel.hpp"
#include "layerd/core/task.hpp"
#include "layerd/sys/fd.hpp"

namespace layerd::proc {

struct ExitStatus {
  bool exited = false;  // true: exit code; false: killed by signal (or unknown, see below)
  int code = 0;         // exit code when exited
  int signal = 0;       // signal number when !exited; 0 when the status is unknown (adopted)
  [[nodiscard]] bool success() const noexcept { return exited && code == 0; }
  // "exited with code 1", "killed by signal 9 (Killed)", "exited (status unknown)".
  [[nodiscard]] std::string describe() const;
  bool operator==(const ExitStatus&) const = default;
};

enum class Stdio {
  kNull,     // /dev/null
  kInherit,  // layerd's own fd
  kCapture,  // a pipe drained by wait(): see Child::captured_stderr()
  kFd,       // SpawnOptions::stdout_fd / stderr_fd, dup'ed into the child (e.g. a log file)
};

struct SpawnOptions {
  // argv[0] is the program; resolved through PATH (of `env` if it sets PATH, else layerd's)
  // when it has no '/'.
  std::vector<std::string> argv;
  std::string cwd;               // empty: inherit
  std::vector<std::string> env;  // "NAME=value" entries; empty: inherit the environment
  // setsid(): the child leads its own session, has no controlling terminal and survives layerd.
  bool new_session = false;
  Stdio stdin_mode = Stdio::kNull;  // kNull or kInherit (or kFd with stdin_fd)
  Stdio stdout_mode = Stdio::kNull;
  Stdio stderr_mode = Stdio::kCapture;
  int stdin_fd = -1, stdout_fd = -1, stderr_fd = -1;  // for Stdio::kFd; dup'ed into the child
  // Captured bytes kept per stream (the first ones). The child is never blocked by capture
  // while a wait() runs: bytes beyond the limit are read and dropped.
  std::size_t capture_limit = 64 * 1024;
};

// A child process (or an adopted process) and its pidfd. Move-only; must not be moved or
// destroyed while a wait() on it is running.
//
// Destroying a Child whose own child is still running does not kill it; the child then becomes
// a zombie nobody reaps when it exits (layerd's children are meant to outlive layerd, but while
// layerd runs, keep the Child and wait() for it).
class Child {
 public:
  Child() = default;
  Child(Child&&) noexcept = default;
  Child& operator=(Child&& other) noexcept;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child();

  // Throws layerd::Error: ENOENT "NAME: command not found" for a program not on PATH; the
  // errno of posix_spawn (ENOENT for a missing cwd, EACCES, ...) with context otherwise.
  static Child spawn(const SpawnOptions& options);

  // A process that is not (necessarily) our child, e.g. a FUSE server left by a previous layerd:
  // pidfd_open. Throws ESRCH if it is gone. If it is in fact our child it is treated as one.
  static Child adopt(pid_t pid);
  // adopt() that also checks /proc/PID/stat's start time (process_start_time) against the one
  // recorded earlier, so a reused pid is never mistaken for the old process: ESRCH otherwise.
  static Child adopt(pid_t pid, long long expected_start_time);

  [[nodiscard]] pid_t pid() const noexcept { return pid_; }
  [[nodiscard]] int pidfd() const noexcept { return pidfd_.get(); }
  [[nodiscard]] bool valid() const noexcept { return pidfd_.valid(); }
  [[nodiscard]] bool is_own_child() const noexcept { return own_child_; }

  // Waits for exit. Own children are reaped (IORING_OP_WAITID when Loop::features().ring_waitid,
  // else a ring poll on the pidfd and waitid(P_PIDFD, WNOHANG)); adopted processes: poll the
  // pidfd only, and the status is unknown: ExitStatus{exited=false, signal=0}. Returns
  // std::nullopt if `cancel` fires before the exit. While it runs it drains the capture pipes,
  // so a child writing megabytes never blocks; after the exit it takes what is left in them
  // without waiting for EOF (a grandchild may hold the pipe open). Once exited, returns the same
  // status at once. One wait() at a time.
  core::Task<std::optional<ExitStatus>> wait(core::CancelSource* cancel = nullptr);

  // pidfd_send_signal: 0 or a negative errno (-ESRCH when the process is gone or reaped).
  int signal(int sig);

  // What was captured so far (complete after wait() returned a status), up to the limit.
  [[nodiscard]] const std::string& captured_stderr() const noexcept { return stderr_.text; }
  [[nodiscard]] const std::string& captured_stdout() const noexcept { return stdout_.text; }
  // Bytes read beyond the capture limit and dropped.
  [[nodiscard]] std::size_t stderr_dropped() const noexcept { return stderr_.dropped; }

  // True once wait() has seen the exit.
  [[nodiscard]] bool exited() const noexcept { return status_.has_value(); }
  [[nodiscard]] const std::optional<ExitStatus>& status() const noexcept { return status_; }

 private:
  struct Capture {
    sys::UniqueFd pipe;  // read end; closed after the exit was seen
    std::string text;
    std::size_t dropped = 0;
    std::size_t limit = 0;
    void keep(const char* data, std::size_t n);
    // Takes what the pipe holds right now without waiting, then closes it.
    void drain_now_and_close() noexcept;
  };
  static core::Task<void> drain(Capture* capture, core::CancelSource* stop);
  core::Task<std::optional<ExitStatus>> await_exit(core::CancelSource* cancel);
  // Reaps without waiting if the child has exited; fills status_.
  bool try_reap() noexcept;

  pid_t pid_ = -1;
  sys::UniqueFd pidfd_;
  bool own_child_ = false;
  std::optional<ExitStatus> status_;
  Capture stdout_;
  Capture stderr_;
};

// Spawns, waits, and kills with SIGKILL once `deadline` has passed (then still waits and reaps).
// Throws on spawn failure.
struct RunResult {
  ExitStatus status;
  std::string stderr_text;
  bool timed_out = false;
  std::string stdout_text;  // with SpawnOptions::stdout_mode = Stdio::kCapture
};
core::Task<RunResult> run(SpawnOptions options, std::chrono::milliseconds deadline);

// Field 22 of /proc/PID/stat (start time in clock ticks since boot): with the pid it identifies
// a process across pid reuse. A negative errno on failure (-ENOENT: no such process).
long long process_start_time(pid_t pid);

}  // namespace layerd::proc
