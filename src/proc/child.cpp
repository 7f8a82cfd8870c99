#include "layerd/proc/child.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <exception>
#include <string_view>
#include <utility>

#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/sys/syscalls.hpp"

extern char** environ;

namespace layerd::proc {

namespace {

// Read size of the capture drains: a few reads per pipe buffer (64 KiB by default).
constexpr std::size_t kDrainChunk = 16 * 1024;
// glibc's execvp default when PATH is unset.
constexpr std::string_view kDefaultPath = "/bin:/usr/bin";

ExitStatus status_from(const siginfo_t& info) {
  if (info.si_code == CLD_EXITED) return ExitStatus{.exited = true, .code = info.si_status};
  // CLD_KILLED or CLD_DUMPED: si_status is the signal.
  return ExitStatus{.exited = false, .signal = info.si_status};
}

// The fields of /proc/PID/stat after the command name, which is in parentheses and may itself
// contain spaces and parentheses: fields[0] is field 3 (state) of proc(5).
int stat_fields(pid_t pid, std::string& text, std::vector<std::string_view>& fields) {
  std::string path = "/proc/" + std::to_string(pid) + "/stat";
  int res = sys::read_small_file(AT_FDCWD, path.c_str(), text, 4096);
  if (res < 0) return res;
  std::size_t close = text.rfind(')');
  if (close == std::string::npos) return -EINVAL;
  std::string_view rest(text);
  rest.remove_prefix(close + 1);
  fields.clear();
  while (!rest.empty()) {
    std::size_t start = rest.find_first_not_of(" \n");
    if (start == std::string_view::npos) break;
    rest.remove_prefix(start);
    std::size_t end = rest.find_first_of(" \n");
    fields.push_back(rest.substr(0, end));
    if (end == std::string_view::npos) break;
    rest.remove_prefix(end);
  }
  return 0;
}

long long parse_number(std::string_view field) {
  long long value = 0;
  auto [ptr, ec] = std::from_chars(field.data(), field.data() + field.size(), value);
  if (ec != std::errc() || ptr != field.data() + field.size()) return -EINVAL;
  return value;
}

pid_t parent_of(pid_t pid) {
  std::string text;
  std::vector<std::string_view> fields;
  if (stat_fields(pid, text, fields) < 0 || fields.size() < 2) return -1;
  return static_cast<pid_t>(parse_number(fields[1]));
}

bool is_executable_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

// The program posix_spawn should exec. Resolved here rather than with posix_spawnp so that "not
// found" is told apart from the other ENOENTs of a spawn (a missing cwd or script interpreter).
// Runs on the loop thread: a few stat()s of PATH directories, which are in the dentry cache.
std::string resolve_program(const std::string& name, const std::vector<std::string>& env) {
  if (name.empty()) throw Error(ENOENT, "spawn: empty program name");
  if (name.find('/') != std::string::npos) return name;
  std::string_view search = kDefaultPath;
  bool path_set = false;
  for (const std::string& entry : env) {
    if (entry.starts_with("PATH=")) {
      search = std::string_view(entry).substr(5);
      path_set = true;
    }
  }
  if (!path_set && env.empty()) {
    if (const char* own = ::getenv("PATH")) search = own;
  }
  for (;;) {
    std::size_t colon = search.find(':');
    std::string_view dir = search.substr(0, colon);
    // An empty PATH entry means the current directory (execvp(3)).
    std::string candidate = dir.empty() ? name : std::string(dir) + "/" + name;
    if (is_executable_file(candidate)) return candidate;
    if (colon == std::string_view::npos) break;
    search.remove_prefix(colon + 1);
  }
  throw Error(ENOENT, name + ": command not found");
}

// posix_spawn attributes and file actions, destroyed on every path.
struct SpawnAttributes {
  posix_spawnattr_t attr;
  posix_spawn_file_actions_t actions;
  SpawnAttributes() {
    check(-posix_spawnattr_init(&attr), "posix_spawnattr_init");
    int res = posix_spawn_file_actions_init(&actions);
    if (res != 0) {
      posix_spawnattr_destroy(&attr);
      throw Error(res, "posix_spawn_file_actions_init");
    }
  }
  ~SpawnAttributes() {
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
  }
  SpawnAttributes(const SpawnAttributes&) = delete;
  SpawnAttributes& operator=(const SpawnAttributes&) = delete;
};

void check_spawn(int res, const char* what) {
  if (res != 0) throw Error(res, what);
}

// Sets up fd `target` (0, 1, 2) of the child. `capture_write` is the write end of the capture
// pipe for kCapture.
void add_stdio(posix_spawn_file_actions_t* actions, int target, Stdio mode, int fd,
               int capture_write) {
  switch (mode) {
    case Stdio::kNull:
      check_spawn(posix_spawn_file_actions_addopen(actions, target, "/dev/null",
                                                   target == 0 ? O_RDONLY : O_WRONLY, 0),
                  "posix_spawn_file_actions_addopen /dev/null");
      return;
    case Stdio::kInherit:
      return;
    case Stdio::kCapture:
      fd = capture_write;
      break;
    case Stdio::kFd:
      if (fd < 0) throw Error(EBADF, "spawn: Stdio::kFd without an fd for fd " +
                                         std::to_string(target));
      break;
  }
  // dup2 clears FD_CLOEXEC on the copy; the original (O_CLOEXEC) closes at exec. glibc also
  // clears FD_CLOEXEC when fd == target.
  check_spawn(posix_spawn_file_actions_adddup2(actions, fd, target),
              "posix_spawn_file_actions_adddup2");
}

std::vector<char*> c_strings(const std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (const std::string& s : strings) out.push_back(const_cast<char*>(s.c_str()));
  out.push_back(nullptr);
  return out;
}

}  // namespace

std::string ExitStatus::describe() const {
  if (exited) return "exited with code " + std::to_string(code);
  if (signal == 0) return "exited (status unknown)";
  std::string text = "killed by signal " + std::to_string(signal);
  if (const char* name = ::sigdescr_np(signal)) text += std::string(" (") + name + ")";
  return text;
}

void Child::Capture::keep(const char* data, std::size_t n) {
  std::size_t room = limit > text.size() ? limit - text.size() : 0;
  std::size_t kept = n < room ? n : room;
  text.append(data, kept);
  dropped += n - kept;
}

void Child::Capture::drain_now_and_close() noexcept {
  if (!pipe) return;
  char buf[kDrainChunk];
  // Bounded: a grandchild that inherited the pipe may keep writing forever. 64 chunks cover a
  // full pipe buffer at the default maximum size (1 MiB).
  for (int round = 0; round < 64; ++round) {
    pollfd ready{.fd = pipe.get(), .events = POLLIN, .revents = 0};
    // Zero timeout: the read below is only done when it cannot block (we are the only reader).
    if (::poll(&ready, 1, 0) <= 0 || !(ready.revents & POLLIN)) break;
    ssize_t n = ::read(pipe.get(), buf, sizeof buf);
    if (n <= 0) break;
    try {
      keep(buf, static_cast<std::size_t>(n));
    } catch (...) {
      break;  // out of memory for the capture: what we have is enough for an error message
    }
  }
  // A grandchild still holding the write end gets EPIPE from now on: captures are for a child's
  // own lifetime (long-lived servers should log to a file, Stdio::kFd).
  pipe.reset();
}

Child& Child::operator=(Child&& other) noexcept {
  if (this != &other) {
    if (pidfd_ && own_child_ && !status_) (void)try_reap();
    pid_ = std::exchange(other.pid_, -1);
    pidfd_ = std::move(other.pidfd_);
    own_child_ = std::exchange(other.own_child_, false);
    status_ = std::exchange(other.status_, std::nullopt);
    stdout_ = std::move(other.stdout_);
    stderr_ = std::move(other.stderr_);
  }
  return *this;
}

Child::~Child() {
  // Reap a child that has already exited so it does not linger as a zombie; a running one is
  // left alone (see the class comment).
  if (pidfd_ && own_child_ && !status_) (void)try_reap();
}

Child Child::spawn(const SpawnOptions& options) {
  if (options.argv.empty()) throw Error(EINVAL, "spawn: empty argv");
  const std::string& name = options.argv.front();
  if (options.stdin_mode == Stdio::kCapture)
    throw Error(EINVAL, "spawn " + name + ": stdin cannot be captured");
  std::string program = resolve_program(name, options.env);

  Child child;
  child.stdout_.limit = options.capture_limit;
  child.stderr_.limit = options.capture_limit;
  sys::UniqueFd stdout_write, stderr_write;
  auto make_pipe = [&](Capture& capture, sys::UniqueFd& write_end) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) < 0) throw Error(errno, "spawn " + name + ": pipe2");
    capture.pipe.reset(fds[0]);
    write_end.reset(fds[1]);
  };
  if (options.stdout_mode == Stdio::kCapture) make_pipe(child.stdout_, stdout_write);
  if (options.stderr_mode == Stdio::kCapture) make_pipe(child.stderr_, stderr_write);

  SpawnAttributes spawn_attrs;
  posix_spawnattr_t* attr = &spawn_attrs.attr;
  posix_spawn_file_actions_t* actions = &spawn_attrs.actions;
  // layerd blocks the signals it reads through its signalfd and ignores SIGPIPE; a child must
  // start with an empty mask and default dispositions or it could never be stopped by SIGTERM.
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
  if (options.new_session) flags |= POSIX_SPAWN_SETSID;
  check_spawn(posix_spawnattr_setflags(attr, flags), "posix_spawnattr_setflags");
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  check_spawn(posix_spawnattr_setsigmask(attr, &none), "posix_spawnattr_setsigmask");
  check_spawn(posix_spawnattr_setsigdefault(attr, &all), "posix_spawnattr_setsigdefault");

  if (!options.cwd.empty())
    check_spawn(posix_spawn_file_actions_addchdir_np(actions, options.cwd.c_str()),
                "posix_spawn_file_actions_addchdir_np");
  add_stdio(actions, 0, options.stdin_mode, options.stdin_fd, -1);
  add_stdio(actions, 1, options.stdout_mode, options.stdout_fd, stdout_write.get());
  add_stdio(actions, 2, options.stderr_mode, options.stderr_fd, stderr_write.get());

  std::vector<char*> argv = c_strings(options.argv);
  std::vector<char*> envp;
  if (!options.env.empty()) envp = c_strings(options.env);
  pid_t pid = -1;
  // glibc runs the child with CLONE_VFORK and reports a failed chdir, dup2 or exec as the
  // return value, so every failure up to the exec lands here.
  int res = ::posix_spawn(&pid, program.c_str(), actions, attr, argv.data(),
                          options.env.empty() ? environ : envp.data());
  if (res != 0) {
    std::string context = "spawn " + program;
    if (!options.cwd.empty()) context += " in " + options.cwd;
    throw Error(res, context);
  }

  // The child is ours and unreaped, so its pid cannot be reused before this pidfd_open: the
  // pidfd is race-free.
  int pidfd = sys::pidfd_open(pid);
  if (pidfd < 0) {
    // Without a pidfd we cannot supervise it: do not leave it running unsupervised.
    (void)::kill(pid, SIGKILL);
    int status;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    throw Error(-pidfd, "spawn " + program + ": pidfd_open of pid " + std::to_string(pid));
  }
  child.pid_ = pid;
  child.pidfd_.reset(pidfd);
  child.own_child_ = true;
  // The write ends close here: the child holds the only copies, so its exit (and its
  // grandchildren's) is the pipes' EOF.
  return child;
}

Child Child::adopt(pid_t pid) {
  if (pid <= 0) throw Error(ESRCH, "adopt: invalid pid " + std::to_string(pid));
  int pidfd = sys::pidfd_open(pid);
  if (pidfd < 0) throw Error(-pidfd, "adopt: pidfd_open of pid " + std::to_string(pid));
  Child child;
  child.pid_ = pid;
  child.pidfd_.reset(pidfd);
  // If it is our own child we must reap it. No new child of ours can appear between the
  // pidfd_open and this check (only this thread spawns), so a matching parent means the pidfd
  // is that child.
  child.own_child_ = parent_of(pid) == ::getpid();
  return child;
}

Child Child::adopt(pid_t pid, long long expected_start_time) {
  Child child = adopt(pid);
  // Read after pidfd_open: if the process at `pid` now is the one recorded, it was also there
  // when the pidfd was opened (it started before), so the pidfd refers to it.
  long long start = process_start_time(pid);
  if (start < 0)
    throw Error(ESRCH, "adopt: process " + std::to_string(pid) + " is gone");
  if (start != expected_start_time)
    throw Error(ESRCH, "adopt: pid " + std::to_string(pid) +
                           " belongs to another process now (pid reused)");
  // A zombie has exited: nothing to adopt (an own zombie is reaped as `child` goes).
  std::string text;
  std::vector<std::string_view> fields;
  if (stat_fields(pid, text, fields) == 0 && !fields.empty() && fields[0] == "Z")
    throw Error(ESRCH, "adopt: process " + std::to_string(pid) + " has exited");
  return child;
}

int Child::signal(int sig) {
  if (!pidfd_) return -EBADF;
  // After reaping, the kernel answers ESRCH itself; a pid is never signalled by number.
  return sys::pidfd_send_signal(pidfd_.get(), sig);
}

bool Child::try_reap() noexcept {
  siginfo_t info{};
  int res = ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd_.get()), &info,
                     WEXITED | WNOHANG);
  if (res < 0) {
    // ECHILD: reaped behind our back (SIGCHLD ignored): it is gone, its status unknown.
    if (errno == ECHILD) {
      status_ = ExitStatus{};
      return true;
    }
    return false;
  }
  // WNOHANG and still running: si_pid stays 0.
  if (info.si_pid == 0) return false;
  status_ = status_from(info);
  return true;
}

core::Task<std::optional<ExitStatus>> Child::await_exit(core::CancelSource* cancel) {
  if (own_child_ && core::Loop::current().features().ring_waitid) {
    siginfo_t info{};
    int res = co_await core::waitid(pidfd_.get(), &info).cancel_on(cancel);
    // A cancel that loses the race still reaps: res is then 0 and the status is real.
    if (res == -ECANCELED) co_return std::nullopt;
    if (res == -ECHILD) {
      status_ = ExitStatus{};
    } else {
      check(res, "waitid for pid " + std::to_string(pid_));
      status_ = status_from(info);
    }
    co_return status_;
  }
  for (;;) {
    // The pidfd polls readable once the process has exited (a zombie, for our own child).
    int res = co_await core::poll(pidfd_.get(), POLLIN).cancel_on(cancel);
    if (res == -ECANCELED) co_return std::nullopt;
    check(res, "poll of the pidfd of pid " + std::to_string(pid_));
    if (!own_child_) {
      // Not ours to reap, and its exit status is reported to its parent only.
      status_ = ExitStatus{};
      co_return status_;
    }
    if (try_reap()) co_return status_;
    // Readable but not yet reapable cannot happen for a thread-group leader; poll again
    // rather than trust it.
  }
}

core::Task<void> Child::drain(Capture* capture, core::CancelSource* stop) {
  std::vector<char> buf(kDrainChunk);
  while (!stop->cancelled()) {
    int n = co_await core::read(capture->pipe.get(), buf.data(),
                                static_cast<unsigned>(buf.size()))
                .cancel_on(stop);
    // 0: EOF (every writer closed); -ECANCELED: the exit was seen or the wait cancelled; what
    // is left is taken without waiting after the exit.
    if (n <= 0) break;
    capture->keep(buf.data(), static_cast<std::size_t>(n));
  }
}

core::Task<std::optional<ExitStatus>> Child::wait(core::CancelSource* cancel) {
  if (status_) co_return status_;
  if (!pidfd_) throw Error(EBADF, "wait on an empty Child");
  // The capture pipes are read while we wait for the exit, so the child never blocks on a
  // full pipe; both stop when the exit is seen (or the wait is cancelled).
  core::CancelSource stop_drains;
  core::Scope drains;
  if (stdout_.pipe) drains.spawn(drain(&stdout_, &stop_drains));
  if (stderr_.pipe) drains.spawn(drain(&stderr_, &stop_drains));
  std::optional<ExitStatus> result;
  std::exception_ptr error;
  try {
    result = co_await await_exit(cancel);
  } catch (...) {
    error = std::current_exception();
  }
  stop_drains.cancel();
  (void)co_await drains.join();
  if (error) std::rethrow_exception(error);
  if (result) {
    stdout_.drain_now_and_close();
    stderr_.drain_now_and_close();
  }
  co_return result;
}

core::Task<RunResult> run(SpawnOptions options, std::chrono::milliseconds deadline) {
  // posix_spawn blocks until the child has exec'd (and PATH is searched with stat calls): done
  // on a worker, so a storm of unmounts (one fusermount3 each) does not stall the loop.
  Child child = co_await core::offload([&options] { return Child::spawn(options); });
  core::CancelSource cancel;
  std::optional<ExitStatus> status;
  {
    core::Deadline timer(cancel, deadline);
    status = co_await child.wait(&cancel);
  }
  bool timed_out = false;
  if (!status) {
    timed_out = true;
    (void)child.signal(SIGKILL);
    status = co_await child.wait();
  }
  co_return RunResult{.status = *status,
                      .stderr_text = child.captured_stderr(),
                      .timed_out = timed_out,
                      .stdout_text = child.captured_stdout()};
}

long long process_start_time(pid_t pid) {
  std::string text;
  std::vector<std::string_view> fields;
  int res = stat_fields(pid, text, fields);
  if (res < 0) return res;
  // Field 22 of proc(5); fields[0] is field 3.
  if (fields.size() < 20) return -EINVAL;
  return parse_number(fields[19]);
}

}  // namespace layerd::proc
