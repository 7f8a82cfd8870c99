// Ring operations: every operation against real fds, files, sockets and children; cancellation of
// each kind of in-flight operation; timeouts and deadlines; more operations than submission-queue
// entries; timer ordering; and the rule that completions resume coroutines from the ready queue,
// never from inside the CQE walk.
#include <fcntl.h>
#include <linux/openat2.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "layerd/core/cancel.hpp"
#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/core/signals.hpp"
#include "layerd/core/task.hpp"
#include "layerd/sys/error.hpp"
#include "layerd/sys/fd.hpp"

using namespace layerd::core;
namespace core = layerd::core;
using layerd::sys::UniqueFd;
using namespace std::chrono_literals;

namespace {

// --- fixtures --------------------------------------------------------------------------------

struct Pipe {
  UniqueFd r, w;
  Pipe() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
    r.reset(fds[0]);
    w.reset(fds[1]);
  }
};

struct SocketPair {
  UniqueFd a, b;
  SocketPair() {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
      throw std::runtime_error("socketpair");
    a.reset(fds[0]);
    b.reset(fds[1]);
  }
};

// A fresh directory under the test's TMPDIR, removed with everything in it at the end.
struct TempDir {
  std::filesystem::path path;
  UniqueFd fd;
  TempDir() {
    std::string templ = (std::filesystem::temp_directory_path() / "layerd-ops-XXXXXX").string();
    if (::mkdtemp(templ.data()) == nullptr) throw std::runtime_error("mkdtemp");
    path = templ;
    fd.reset(::open(templ.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

// A listening unix stream socket on a path in its own directory.
struct UnixListener {
  TempDir dir;
  sockaddr_un addr{};
  UniqueFd fd;
  explicit UnixListener(int backlog = 16) {
    addr.sun_family = AF_UNIX;
    std::string p = (dir.path / "sock").string();
    std::strncpy(addr.sun_path, p.c_str(), sizeof addr.sun_path - 1);
    fd.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(fd.get(), backlog) != 0)
      throw std::runtime_error("bind/listen");
  }
  [[nodiscard]] const sockaddr* sa() const { return reinterpret_cast<const sockaddr*>(&addr); }
};

bool has_cloexec(int fd) { return (::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0; }

// Fills a listener's backlog with non-blocking connects until it refuses more (EAGAIN): a
// blocking connect to it then waits for room that never comes.
std::vector<UniqueFd> fill_backlog(const UnixListener& l) {
  std::vector<UniqueFd> queued;
  for (int i = 0; i < 64; ++i) {
    UniqueFd c(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (::connect(c.get(), l.sa(), sizeof l.addr) != 0) break;
    queued.push_back(std::move(c));
  }
  return queued;
}

// A forked child that exits with `status` at once, or (status < 0) sleeps until killed.
struct Child {
  pid_t pid = -1;
  UniqueFd pidfd;
  bool reaped = false;
  explicit Child(int status) {
    pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork");
    if (pid == 0) {
      if (status >= 0) ::_exit(status);
      for (;;) ::pause();
    }
    pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
    if (!pidfd) throw std::runtime_error("pidfd_open");
  }
  ~Child() {
    if (!reaped) {
      (void)::kill(pid, SIGKILL);
      (void)::waitpid(pid, nullptr, 0);
    }
  }
};

Task<void> cancel_after(CancelSource* source, std::chrono::nanoseconds d) {
  (void)co_await sleep(d);
  source->cancel();
}

Task<void> write_after(int fd, std::string data, std::chrono::nanoseconds d) {
  (void)co_await sleep(d);
  int n = co_await core::write(fd, data.data(), static_cast<unsigned>(data.size()));
  EXPECT_EQ(n, static_cast<int>(data.size()));
}

// --- plain operations ------------------------------------------------------------------------

TEST(Ops, NopCompletesWithZero) {
  Loop loop;
  auto body = []() -> Task<int> { co_return co_await nop(); };
  EXPECT_EQ(loop.block_on(body()), 0);
}

Task<std::string> pipe_round_trip(int r, int w) {
  const char msg[] = "hello ring";
  int n = co_await core::write(w, msg, sizeof msg - 1);
  EXPECT_EQ(n, static_cast<int>(sizeof msg - 1));
  char buf[64] = {};
  n = co_await core::read(r, buf, sizeof buf);
  if (n < 0) co_return "error " + std::to_string(n);
  co_return std::string(buf, static_cast<std::size_t>(n));
}

TEST(Ops, ReadAndWriteOnAPipe) {
  Loop loop;
  Pipe p;
  EXPECT_EQ(loop.block_on(pipe_round_trip(p.r.get(), p.w.get())), "hello ring");
}

Task<std::string> read_waits_for_data(int r, int w) {
  Scope scope;
  scope.spawn(write_after(w, "late", 20ms));
  char buf[16] = {};
  int n = co_await core::read(r, buf, sizeof buf);
  EXPECT_TRUE(co_await scope.join());
  co_return n < 0 ? std::string("error") : std::string(buf, static_cast<std::size_t>(n));
}

TEST(Ops, ReadSuspendsUntilDataArrives) {
  Loop loop;
  Pipe p;
  EXPECT_EQ(loop.block_on(read_waits_for_data(p.r.get(), p.w.get())), "late");
}

Task<void> file_ops(int dirfd) {
  int fd = co_await core::openat(dirfd, "data", O_CREAT | O_RDWR | O_EXCL, 0640);
  EXPECT_GE(fd, 0);
  if (fd < 0) co_return;
  EXPECT_TRUE(has_cloexec(fd));
  // O_EXCL on an existing file: the errno comes back as the result.
  EXPECT_EQ(co_await core::openat(dirfd, "data", O_CREAT | O_RDWR | O_EXCL, 0640), -EEXIST);
  EXPECT_EQ(co_await core::openat(dirfd, "missing", O_RDONLY), -ENOENT);

  EXPECT_EQ(co_await core::write(fd, "abcdef", 6, 0), 6);
  EXPECT_EQ(co_await core::write(fd, "XY", 2, 10), 2);  // a hole from 6 to 10
  EXPECT_EQ(co_await core::fsync(fd), 0);
  EXPECT_EQ(co_await core::fsync(fd, IORING_FSYNC_DATASYNC), 0);
  char buf[4] = {};
  EXPECT_EQ(co_await core::read(fd, buf, 3, 2), 3);
  EXPECT_EQ(std::string(buf, 3), "cde");
  EXPECT_EQ(co_await core::read(fd, buf, 4, 12), 0);  // at end of file

  struct statx stx {};
  EXPECT_EQ(co_await core::statx(dirfd, "data", AT_SYMLINK_NOFOLLOW, STATX_SIZE | STATX_MODE,
                                 &stx),
            0);
  EXPECT_EQ(stx.stx_size, 12u);
  EXPECT_TRUE(S_ISREG(stx.stx_mode));
  EXPECT_EQ(stx.stx_mode & 0777, 0640 & ~[] { mode_t m = ::umask(0); ::umask(m); return m; }());
  // statx on the fd itself (empty path).
  EXPECT_EQ(co_await core::statx(fd, "", AT_EMPTY_PATH, STATX_SIZE, &stx), 0);
  EXPECT_EQ(stx.stx_size, 12u);
  EXPECT_EQ(co_await core::statx(dirfd, "missing", 0, STATX_SIZE, &stx), -ENOENT);

  EXPECT_EQ(co_await core::close(fd), 0);
  errno = 0;
  EXPECT_EQ(::fcntl(fd, F_GETFD), -1);
  EXPECT_EQ(errno, EBADF);
  EXPECT_EQ(co_await core::fsync(fd), -EBADF);
}

TEST(Ops, FileOpenReadWriteFsyncStatxClose) {
  Loop loop;
  TempDir dir;
  loop.block_on(file_ops(dir.fd.get()));
}

Task<void> openat2_ops(int dirfd) {
  EXPECT_EQ(co_await core::mkdirat(dirfd, "root", 0755), 0);
  EXPECT_EQ(co_await core::mkdirat(dirfd, "root/sub", 0755), 0);
  int root = co_await core::openat(dirfd, "root", O_PATH | O_DIRECTORY);
  EXPECT_GE(root, 0);
  if (root < 0) co_return;
  UniqueFd root_fd(root);
  EXPECT_EQ(co_await core::openat(dirfd, "x", O_CREAT | O_WRONLY, 0600) >= 0, true);

  open_how how{};
  how.flags = O_CREAT | O_WRONLY;
  how.mode = 0600;
  how.resolve = RESOLVE_BENEATH;
  int fd = co_await core::openat2(root, "sub/file", &how);
  EXPECT_GE(fd, 0);
  UniqueFd file(fd);
  // openat2() adds O_CLOEXEC itself
  if (fd >= 0) {
    EXPECT_TRUE(has_cloexec(fd));
  }

  // ../x exists (dirfd/x) but lies outside the root: RESOLVE_BENEATH refuses with EXDEV.
  open_how escape{};
  escape.flags = O_RDONLY;
  escape.resolve = RESOLVE_BENEATH;
  EXPECT_EQ(co_await core::openat2(root, "../x", &escape), -EXDEV);
  // So does an absolute path, and a symlink that points out.
  EXPECT_EQ(co_await core::openat2(root, "/etc/passwd", &escape), -EXDEV);
  EXPECT_EQ(co_await core::symlinkat("../../x", root, "sub/out"), 0);
  EXPECT_EQ(co_await core::openat2(root, "sub/out", &escape), -EXDEV);
  // Without RESOLVE_BENEATH the same path resolves.
  open_how plain{};
  plain.flags = O_RDONLY;
  int outside = co_await core::openat2(root, "../x", &plain);
  EXPECT_GE(outside, 0);
  UniqueFd outside_fd(outside);
}

TEST(Ops, Openat2ResolveBeneathRejectsEscapes) {
  Loop loop;
  TempDir dir;
  loop.block_on(openat2_ops(dir.fd.get()));
}

Task<void> namespace_ops(int dirfd) {
  EXPECT_EQ(co_await core::mkdirat(dirfd, "d", 0700), 0);
  EXPECT_EQ(co_await core::mkdirat(dirfd, "d", 0700), -EEXIST);
  int fd = co_await core::openat(dirfd, "d/f", O_CREAT | O_WRONLY, 0600);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(co_await core::close(fd), 0);

  EXPECT_EQ(co_await core::symlinkat("d/f", dirfd, "link"), 0);
  EXPECT_EQ(co_await core::symlinkat("d/f", dirfd, "link"), -EEXIST);
  char target[64] = {};
  EXPECT_EQ(::readlinkat(dirfd, "link", target, sizeof target), 3);
  EXPECT_STREQ(target, "d/f");

  EXPECT_EQ(co_await core::linkat(dirfd, "d/f", dirfd, "hard"), 0);
  struct statx stx {};
  EXPECT_EQ(co_await core::statx(dirfd, "hard", 0, STATX_NLINK, &stx), 0);
  EXPECT_EQ(stx.stx_nlink, 2u);
  // AT_SYMLINK_FOLLOW links the symlink's target, not the symlink.
  EXPECT_EQ(co_await core::linkat(dirfd, "link", dirfd, "hard2", AT_SYMLINK_FOLLOW), 0);
  EXPECT_EQ(co_await core::statx(dirfd, "hard2", AT_SYMLINK_NOFOLLOW, STATX_NLINK | STATX_MODE,
                                 &stx),
            0);
  EXPECT_EQ(stx.stx_nlink, 3u);
  EXPECT_TRUE(S_ISREG(stx.stx_mode));

  EXPECT_EQ(co_await core::renameat(dirfd, "hard", dirfd, "d/moved"), 0);
  EXPECT_EQ(co_await core::statx(dirfd, "hard", 0, 0, &stx), -ENOENT);
  EXPECT_EQ(co_await core::statx(dirfd, "d/moved", 0, 0, &stx), 0);
  // RENAME_NOREPLACE refuses to clobber.
  EXPECT_EQ(co_await core::renameat(dirfd, "hard2", dirfd, "d/moved", RENAME_NOREPLACE), -EEXIST);
  // RENAME_EXCHANGE swaps two names.
  EXPECT_EQ(co_await core::renameat(dirfd, "link", dirfd, "hard2", RENAME_EXCHANGE), 0);
  EXPECT_EQ(co_await core::statx(dirfd, "hard2", AT_SYMLINK_NOFOLLOW, STATX_MODE, &stx), 0);
  EXPECT_TRUE(S_ISLNK(stx.stx_mode));

  EXPECT_EQ(co_await core::unlinkat(dirfd, "d", 0), -EISDIR);
  EXPECT_EQ(co_await core::unlinkat(dirfd, "d", AT_REMOVEDIR), -ENOTEMPTY);
  for (const char* name : {"d/f", "d/moved", "link", "hard2"})
    EXPECT_EQ(co_await core::unlinkat(dirfd, name, 0), 0) << name;
  EXPECT_EQ(co_await core::unlinkat(dirfd, "d", AT_REMOVEDIR), 0);
  EXPECT_EQ(co_await core::unlinkat(dirfd, "d", AT_REMOVEDIR), -ENOENT);
}

TEST(Ops, MkdirSymlinkLinkRenameUnlink) {
  Loop loop;
  TempDir dir;
  loop.block_on(namespace_ops(dir.fd.get()));
  EXPECT_TRUE(std::filesystem::is_empty(dir.path));
}

Task<std::string> send_recv(int a, int b) {
  std::string msg(100'000, 'z');
  msg[0] = 'a';
  // Large enough to exceed the socket buffer: send completes as the peer drains it.
  Scope scope;
  std::string got;
  struct Reader {
    static Task<void> run(int fd, std::string* out, std::size_t want) {
      char buf[8192];
      while (out->size() < want) {
        int n = co_await core::recv(fd, buf, sizeof buf);
        if (n <= 0) break;
        out->append(buf, static_cast<std::size_t>(n));
      }
    }
  };
  scope.spawn(Reader::run(b, &got, msg.size()));
  std::size_t sent = 0;
  while (sent < msg.size()) {
    int n = co_await core::send(a, msg.data() + sent, msg.size() - sent);
    if (n <= 0) break;
    sent += static_cast<std::size_t>(n);
  }
  EXPECT_TRUE(co_await scope.join());
  EXPECT_EQ(got, msg);
  // A peer that went away is an EPIPE result, never a SIGPIPE (MSG_NOSIGNAL).
  ::close(b);
  char c = 'x';
  int n = 0;
  for (int i = 0; i < 2 && n >= 0; ++i) n = co_await core::send(a, &c, 1);
  co_return n == -EPIPE || n == -ECONNRESET ? "epipe" : "n=" + std::to_string(n);
}

TEST(Ops, SendAndRecvOnASocketPair) {
  Loop loop;
  SocketPair sp;
  int b = sp.b.release();  // closed by the coroutine
  EXPECT_EQ(loop.block_on(send_recv(sp.a.get(), b)), "epipe");
}

Task<void> accept_one(int listener, int* accepted) {
  *accepted = co_await core::accept(listener);
}

Task<void> accept_connect(const UnixListener* l) {
  Scope scope;
  int accepted = -1;
  scope.spawn(accept_one(l->fd.get(), &accepted));
  UniqueFd client(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(co_await core::connect(client.get(), l->sa(), sizeof l->addr), 0);
  EXPECT_TRUE(co_await scope.join());
  EXPECT_GE(accepted, 0);
  if (accepted < 0) co_return;
  UniqueFd server(accepted);
  EXPECT_TRUE(has_cloexec(accepted));  // accept() always asks for SOCK_CLOEXEC
  EXPECT_EQ(co_await core::send(client.get(), "ping", 4), 4);
  char buf[8] = {};
  EXPECT_EQ(co_await core::recv(server.get(), buf, sizeof buf), 4);
  EXPECT_STREQ(buf, "ping");

  // connect to a path nobody listens on
  sockaddr_un nowhere{};
  nowhere.sun_family = AF_UNIX;
  std::string p = (l->dir.path / "nobody").string();
  std::strncpy(nowhere.sun_path, p.c_str(), sizeof nowhere.sun_path - 1);
  UniqueFd lonely(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(co_await core::connect(lonely.get(), reinterpret_cast<sockaddr*>(&nowhere),
                                   sizeof nowhere),
            -ENOENT);
}

TEST(Ops, AcceptAndConnectOverAUnixSocket) {
  Loop loop;
  UnixListener l;
  loop.block_on(accept_connect(&l));
}

Task<int> poll_for_input(int r, int w) {
  Scope scope;
  scope.spawn(write_after(w, "!", 10ms));
  int mask = co_await core::poll(r, POLLIN);
  EXPECT_TRUE(co_await scope.join());
  co_return mask;
}

TEST(Ops, PollResolvesToTheReadyMask) {
  Loop loop;
  Pipe p;
  int mask = loop.block_on(poll_for_input(p.r.get(), p.w.get()));
  EXPECT_TRUE(mask & POLLIN) << mask;
  // A write end polled for output is ready at once.
  auto out = [](int w) -> Task<int> { co_return co_await core::poll(w, POLLOUT); };
  EXPECT_TRUE(loop.block_on(out(p.w.get())) & POLLOUT);
  // A pipe whose write end is closed reports POLLHUP.
  p.w.reset();
  auto in = [](int r) -> Task<int> { co_return co_await core::poll(r, POLLIN); };
  EXPECT_TRUE(loop.block_on(in(p.r.get())) & POLLHUP);
}

Task<int> timed_sleep(std::chrono::nanoseconds d) { co_return co_await sleep(d); }

TEST(Ops, SleepWaitsAtLeastItsDuration) {
  Loop loop;
  auto start = Clock::now();
  EXPECT_EQ(loop.block_on(timed_sleep(30ms)), 0);  // -ETIME is mapped to success
  auto elapsed = Clock::now() - start;
  EXPECT_GE(elapsed, 30ms);
  EXPECT_LT(elapsed, 2s);
  // Zero and negative durations complete at once.
  start = Clock::now();
  EXPECT_EQ(loop.block_on(timed_sleep(0ns)), 0);
  EXPECT_EQ(loop.block_on(timed_sleep(-5ms)), 0);
  EXPECT_LT(Clock::now() - start, 1s);
}

// --- children --------------------------------------------------------------------------------

Task<int> wait_child(int pidfd, siginfo_t* info) { co_return co_await core::waitid(pidfd, info); }

TEST(Ops, WaitidReapsAnExitedChildThroughTheRing) {
  Loop loop;
  if (!loop.features().ring_waitid) GTEST_SKIP() << "kernel lacks IORING_OP_WAITID (Linux 6.7)";
  Child child(7);
  siginfo_t info{};
  EXPECT_EQ(loop.block_on(wait_child(child.pidfd.get(), &info)), 0);
  child.reaped = true;
  EXPECT_EQ(info.si_pid, child.pid);
  EXPECT_EQ(info.si_code, CLD_EXITED);
  EXPECT_EQ(info.si_status, 7);
  // Reaped: the pid is gone for waitpid as well.
  EXPECT_EQ(::waitpid(child.pid, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD);
}

TEST(Ops, WaitidSeesAKilledChild) {
  Loop loop;
  if (!loop.features().ring_waitid) GTEST_SKIP() << "kernel lacks IORING_OP_WAITID (Linux 6.7)";
  Child child(-1);
  ASSERT_EQ(::syscall(SYS_pidfd_send_signal, child.pidfd.get(), SIGKILL, nullptr, 0), 0);
  siginfo_t info{};
  EXPECT_EQ(loop.block_on(wait_child(child.pidfd.get(), &info)), 0);
  child.reaped = true;
  EXPECT_EQ(info.si_code, CLD_KILLED);
  EXPECT_EQ(info.si_status, SIGKILL);
}

// --- signals and offload ---------------------------------------------------------------------

Task<int> next_signal(SignalSet* set, CancelSource* cancel) { co_return co_await set->next(cancel); }

Task<void> raise_after(int sig, std::chrono::nanoseconds d) {
  (void)co_await sleep(d);
  ::raise(sig);
}

Task<int> signal_while_waiting(SignalSet* set) {
  Scope scope;
  scope.spawn(raise_after(SIGUSR2, 30ms));
  int sig = co_await set->next();
  EXPECT_TRUE(co_await scope.join());
  co_return sig;
}

TEST(Signals, ABlockedSignalIsReadFromTheRing) {
  Loop loop;
  {
    SignalSet set{SIGUSR1, SIGUSR2};
    // Raised before anyone waits: pending, then read.
    ASSERT_EQ(::raise(SIGUSR1), 0);
    EXPECT_EQ(loop.block_on(next_signal(&set, nullptr)), SIGUSR1);
    // Raised while a read is in flight. The wait must sleep, not spin on -EAGAIN: count the
    // completions reaped meanwhile.
    auto reaped = loop.completions_reaped();
    EXPECT_EQ(loop.block_on(signal_while_waiting(&set)), SIGUSR2);
    EXPECT_LT(loop.completions_reaped() - reaped, 20u);
    // Cancelled wait.
    CancelSource cancel;
    cancel.cancel();
    EXPECT_EQ(loop.block_on(next_signal(&set, &cancel)), -ECANCELED);
  }
  // The mask is restored: SIGUSR1 is no longer blocked.
  sigset_t now;
  pthread_sigmask(SIG_SETMASK, nullptr, &now);
  EXPECT_FALSE(sigismember(&now, SIGUSR1));
}

Task<int> cancelled_signal_wait(SignalSet* set) {
  CancelSource cancel;
  Scope scope;
  scope.spawn(cancel_after(&cancel, 20ms));
  int res = co_await set->next(&cancel);
  EXPECT_TRUE(co_await scope.join());
  co_return res;
}

TEST(Signals, AWaitInFlightCanBeCancelled) {
  Loop loop;
  SignalSet set{SIGUSR1};
  EXPECT_EQ(loop.block_on(cancelled_signal_wait(&set)), -ECANCELED);
}

int slow_square(int x) {
  std::this_thread::sleep_for(5ms);
  return x * x;
}

Task<int> offload_value() {
  auto loop_thread = std::this_thread::get_id();
  std::thread::id worker;
  int v = co_await offload([&worker] {
    worker = std::this_thread::get_id();
    return slow_square(12);
  });
  EXPECT_NE(worker, loop_thread);
  EXPECT_EQ(std::this_thread::get_id(), loop_thread);
  co_return v;
}

Task<std::string> offload_throws() {
  try {
    co_await offload([] { throw layerd::Error(ENOTEMPTY, "walk failed"); });
  } catch (const layerd::Error& e) {
    co_return std::string(e.what()) + "/" + std::to_string(e.errno_value());
  }
  co_return "no exception";
}

Task<void> offload_one(int x, std::vector<int>* out) {
  out->push_back(co_await offload([x] { return slow_square(x); }));
}

Task<void> many_offloads(std::vector<int>* out) {
  Scope scope;
  for (int i = 0; i < 40; ++i) scope.spawn(offload_one(i, out));
  EXPECT_TRUE(co_await scope.join());
}

TEST(Offload, ReturnsAValueFromAWorkerThread) {
  Loop loop;
  EXPECT_EQ(loop.block_on(offload_value()), 144);
}

TEST(Offload, PropagatesAnException) {
  Loop loop;
  std::string got = loop.block_on(offload_throws());
  EXPECT_NE(got.find("walk failed"), std::string::npos) << got;
  EXPECT_NE(got.find(std::to_string(ENOTEMPTY)), std::string::npos) << got;
}

TEST(Offload, ManyJobsAllComeBack) {
  Loop loop;
  std::vector<int> out;
  loop.block_on(many_offloads(&out));
  ASSERT_EQ(out.size(), 40u);
  std::sort(out.begin(), out.end());
  for (int i = 0; i < 40; ++i) EXPECT_EQ(out[i], i * i);
}

// --- cancellation ----------------------------------------------------------------------------

struct Cancelled {
  int result = 0;
  bool in_flight_at_resume = true;
  std::uint64_t reaped_during = 0;
  Clock::duration elapsed{};
};

// Awaits `op` while a sibling cancels `source` after `after`. Records whether the operation was
// still in flight when the coroutine resumed (it must not be: resumption only follows the op's
// own CQE).
template <typename OpT>
Task<Cancelled> await_with_cancel(OpT* op, std::chrono::nanoseconds after) {
  CancelSource source;
  Scope scope;
  op->cancel_on(source);
  scope.spawn(cancel_after(&source, after));
  Loop& loop = Loop::current();
  auto reaped = loop.completions_reaped();
  auto start = Clock::now();
  Cancelled out;
  out.result = co_await *op;
  out.elapsed = Clock::now() - start;
  out.in_flight_at_resume = op->in_flight();
  out.reaped_during = loop.completions_reaped() - reaped;
  EXPECT_TRUE(co_await scope.join());
  co_return out;
}

void expect_cancelled(const Cancelled& c) {
  EXPECT_EQ(c.result, -ECANCELED) << std::strerror(-c.result);
  EXPECT_FALSE(c.in_flight_at_resume);
  // The sleep of the canceller, the op's own CQE (and the cancel request's).
  EXPECT_GE(c.reaped_during, 2u);
  EXPECT_GE(c.elapsed, 10ms);
  EXPECT_LT(c.elapsed, 5s);
}

TEST(Cancel, ReadOnAnEmptyPipe) {
  Loop loop;
  Pipe p;
  char buf[8];
  auto op = core::read(p.r.get(), buf, sizeof buf);
  expect_cancelled(loop.block_on(await_with_cancel(&op, 10ms)));
  // Nothing was consumed: a later write is read normally.
  ASSERT_EQ(::write(p.w.get(), "a", 1), 1);
  EXPECT_EQ(loop.block_on(pipe_round_trip(p.r.get(), p.w.get())), "ahello ring");
}

TEST(Cancel, Recv) {
  Loop loop;
  SocketPair sp;
  char buf[8];
  auto op = core::recv(sp.a.get(), buf, sizeof buf);
  expect_cancelled(loop.block_on(await_with_cancel(&op, 10ms)));
}

TEST(Cancel, Accept) {
  Loop loop;
  UnixListener l;
  auto op = core::accept(l.fd.get());
  expect_cancelled(loop.block_on(await_with_cancel(&op, 10ms)));
}

TEST(Cancel, Poll) {
  Loop loop;
  Pipe p;
  auto op = core::poll(p.r.get(), POLLIN);
  expect_cancelled(loop.block_on(await_with_cancel(&op, 10ms)));
}

TEST(Cancel, Sleep) {
  Loop loop;
  auto op = sleep(30s);
  expect_cancelled(loop.block_on(await_with_cancel(&op, 10ms)));
}

TEST(Cancel, ConnectToAListenerWithAFullBacklog) {
  Loop loop;
  UnixListener l(0);
  std::vector<UniqueFd> queued = fill_backlog(l);
  ASSERT_LT(queued.size(), 64u);
  // A blocking socket: its connect waits for room in the backlog, which never comes.
  UniqueFd client(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  auto op = core::connect(client.get(), l.sa(), sizeof l.addr);
  Cancelled c = loop.block_on(await_with_cancel(&op, 20ms));
  // The connect blocks in an io-wq worker, which the cancel interrupts (the kernel says -EINTR);
  // the loop reports it as -ECANCELED like every other cancellation.
  EXPECT_EQ(c.result, -ECANCELED) << std::strerror(-c.result);
  EXPECT_FALSE(c.in_flight_at_resume);
  EXPECT_GE(c.elapsed, 20ms);
}

TEST(Cancel, WaitidOnASleepingChild) {
  Loop loop;
  if (!loop.features().ring_waitid) GTEST_SKIP() << "kernel lacks IORING_OP_WAITID (Linux 6.7)";
  Child child(-1);
  siginfo_t info{};
  auto op = core::waitid(child.pidfd.get(), &info);
  expect_cancelled(loop.block_on(await_with_cancel(&op, 10ms)));
  // The child was not reaped by the cancelled wait: a new one reaps it after the kill.
  ASSERT_EQ(::syscall(SYS_pidfd_send_signal, child.pidfd.get(), SIGKILL, nullptr, 0), 0);
  siginfo_t after{};
  EXPECT_EQ(loop.block_on(wait_child(child.pidfd.get(), &after)), 0);
  child.reaped = true;
  EXPECT_EQ(after.si_pid, child.pid);
  EXPECT_EQ(after.si_code, CLD_KILLED);
}

Task<int> read_with_source(int fd, CancelSource* source) {
  char buf[8];
  co_return co_await core::read(fd, buf, sizeof buf).cancel_on(source);
}

TEST(Cancel, AnAlreadyCancelledSourceSubmitsNothing) {
  Loop loop;
  Pipe p;
  ASSERT_EQ(::write(p.w.get(), "q", 1), 1);
  CancelSource source;
  source.cancel();
  auto reaped = loop.completions_reaped();
  // Data is there, so a submitted read would succeed: -ECANCELED proves it never ran.
  EXPECT_EQ(loop.block_on(read_with_source(p.r.get(), &source)), -ECANCELED);
  EXPECT_EQ(loop.completions_reaped(), reaped);
  char c = 0;
  EXPECT_EQ(::read(p.r.get(), &c, 1), 1);
  EXPECT_EQ(c, 'q');
}

TEST(Cancel, AnOperationThatFinishedIsNotAffected) {
  Loop loop;
  Pipe p;
  ASSERT_EQ(::write(p.w.get(), "data", 4), 4);
  CancelSource source;
  EXPECT_EQ(loop.block_on(read_with_source(p.r.get(), &source)), 4);
  source.cancel();  // nothing registered any more
  EXPECT_TRUE(source.cancelled());
}

// Many operations on one source, cancelled together.
Task<void> read_into(int fd, CancelSource* source, std::vector<int>* results) {
  char buf[8];
  results->push_back(co_await core::read(fd, buf, sizeof buf).cancel_on(source));
}

Task<void> cancel_many(int fd, std::vector<int>* results) {
  CancelSource source;
  Scope scope;
  for (int i = 0; i < 50; ++i) scope.spawn(read_into(fd, &source, results));
  scope.spawn(cancel_after(&source, 10ms));
  EXPECT_TRUE(co_await scope.join());
}

TEST(Cancel, OneSourceCancelsEveryRegisteredOperation) {
  Loop loop;
  Pipe p;
  std::vector<int> results;
  loop.block_on(cancel_many(p.r.get(), &results));
  ASSERT_EQ(results.size(), 50u);
  for (int r : results) EXPECT_EQ(r, -ECANCELED);
}

Task<int> read_with_timeout(int fd, std::chrono::nanoseconds d) {
  char buf[8];
  co_return co_await core::read(fd, buf, sizeof buf).timeout(d);
}

TEST(Timeout, AReadThatNeverCompletesFailsAfterTheTimeout) {
  Loop loop;
  Pipe p;
  auto start = Clock::now();
  EXPECT_EQ(loop.block_on(read_with_timeout(p.r.get(), 40ms)), -ECANCELED);
  auto elapsed = Clock::now() - start;
  EXPECT_GE(elapsed, 40ms);
  EXPECT_LT(elapsed, 2s);
}

TEST(Timeout, AReadThatCompletesInTimeKeepsItsResult) {
  Loop loop;
  Pipe p;
  ASSERT_EQ(::write(p.w.get(), "abc", 3), 3);
  EXPECT_EQ(loop.block_on(read_with_timeout(p.r.get(), 5s)), 3);
  // The linked timeout was cancelled with the read: the loop can go at once.
}

Task<int> connect_with_timeout(int fd, const sockaddr* sa, socklen_t len) {
  co_return co_await core::connect(fd, sa, len).timeout(20ms);
}

TEST(Timeout, ABlockedConnectTimesOutWithEcanceled) {
  Loop loop;
  UnixListener l(0);
  std::vector<UniqueFd> queued = fill_backlog(l);
  ASSERT_LT(queued.size(), 64u);
  UniqueFd client(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  auto start = Clock::now();
  // The linked timeout interrupts the connect in its io-wq worker (-EINTR from the kernel).
  int res = loop.block_on(connect_with_timeout(client.get(), l.sa(), sizeof l.addr));
  EXPECT_EQ(res, -ECANCELED) << std::strerror(-res);
  EXPECT_GE(Clock::now() - start, 20ms);
}

Task<int> timeout_and_cancel(int fd, CancelSource* source) {
  char buf[8];
  co_return co_await core::read(fd, buf, sizeof buf).cancel_on(source).timeout(10s);
}

Task<int> timeout_and_cancel_race(int fd) {
  CancelSource source;
  Scope scope;
  scope.spawn(cancel_after(&source, 10ms));
  int res = co_await timeout_and_cancel(fd, &source);
  EXPECT_TRUE(co_await scope.join());
  co_return res;
}

TEST(Timeout, CancelOfAnOperationWithALinkedTimeout) {
  Loop loop;
  Pipe p;
  auto start = Clock::now();
  EXPECT_EQ(loop.block_on(timeout_and_cancel_race(p.r.get())), -ECANCELED);
  EXPECT_LT(Clock::now() - start, 5s);
}

Task<bool> read_until_deadline(int fd, std::chrono::nanoseconds d, int* result) {
  CancelSource source;
  Deadline deadline(source, d);
  char buf[8];
  *result = co_await core::read(fd, buf, sizeof buf).cancel_on(source);
  co_return deadline.expired();
}

TEST(Deadline, CancelsTheSourceWhenItPasses) {
  Loop loop;
  Pipe p;
  int result = 0;
  auto start = Clock::now();
  EXPECT_TRUE(loop.block_on(read_until_deadline(p.r.get(), 30ms, &result)));
  EXPECT_EQ(result, -ECANCELED);
  EXPECT_GE(Clock::now() - start, 30ms);
}

TEST(Deadline, ADisarmedDeadlineCancelsNothing) {
  Loop loop;
  Pipe p;
  ASSERT_EQ(::write(p.w.get(), "ok", 2), 2);
  int result = 0;
  // The read finishes first; the Deadline is destroyed with its timer still armed: the timer is
  // removed and its state freed on its own CQE (the loop drains it; ASan would see a leak).
  EXPECT_FALSE(loop.block_on(read_until_deadline(p.r.get(), 10s, &result)));
  EXPECT_EQ(result, 2);
}

Task<bool> disarm_then_wait(CancelSource* source) {
  Deadline deadline(*source, 10ms);
  deadline.disarm();
  (void)co_await sleep(40ms);
  co_return deadline.expired();
}

TEST(Deadline, DisarmBeforeExpiryKeepsTheSourceAlive) {
  Loop loop;
  CancelSource source;
  EXPECT_FALSE(loop.block_on(disarm_then_wait(&source)));
  EXPECT_FALSE(source.cancelled());
}

// --- scale and ordering ----------------------------------------------------------------------

Task<void> sleep_and_count(std::chrono::nanoseconds d, int* count) {
  EXPECT_EQ(co_await sleep(d), 0);
  ++*count;
}

Task<void> thousand_sleeps(int* count) {
  Scope scope;
  for (int i = 0; i < 1000; ++i) scope.spawn(sleep_and_count(std::chrono::microseconds(i % 7 * 500), count));
  EXPECT_TRUE(co_await scope.join());
}

TEST(Scale, MoreSleepsInFlightThanSubmissionQueueEntries) {
  Loop loop(LoopOptions{.sq_entries = 8});
  int count = 0;
  loop.block_on(thousand_sleeps(&count));
  EXPECT_EQ(count, 1000);
}

Task<void> read_one_byte(int fd, std::string* out) {
  char c;
  int n = co_await core::read(fd, &c, 1);
  EXPECT_EQ(n, 1);
  if (n == 1) out->push_back(c);
}

Task<void> thousand_reads(int r, int w, std::string* out) {
  Scope scope;
  for (int i = 0; i < 1000; ++i) scope.spawn(read_one_byte(r, out));
  // Let every read reach the kernel and park before any data exists.
  for (int i = 0; i < 3; ++i) co_await yield();
  (void)co_await sleep(10ms);
  std::string data(1000, 'r');
  int n = co_await core::write(w, data.data(), static_cast<unsigned>(data.size()));
  EXPECT_EQ(n, 1000);
  EXPECT_TRUE(co_await scope.join());
}

TEST(Scale, MorePipeReadsInFlightThanSubmissionQueueEntries) {
  Loop loop(LoopOptions{.sq_entries = 8});
  Pipe p;
  std::string out;
  loop.block_on(thousand_reads(p.r.get(), p.w.get(), &out));
  EXPECT_EQ(out, std::string(1000, 'r'));
}

Task<void> sleep_then_record(std::chrono::nanoseconds d, int id, std::vector<int>* order) {
  (void)co_await sleep(d);
  order->push_back(id);
}

Task<void> ordered_sleeps(std::vector<int>* order) {
  std::vector<int> ids(20);
  for (int i = 0; i < 20; ++i) ids[i] = i;
  std::mt19937 rng(1234);
  std::shuffle(ids.begin(), ids.end(), rng);
  Scope scope;
  // Started in shuffled order; durations 5ms apart, so each finishes in order of its length.
  for (int id : ids) scope.spawn(sleep_then_record(std::chrono::milliseconds(5 + 5 * id), id, order));
  EXPECT_TRUE(co_await scope.join());
}

TEST(Timers, CompleteInOrderOfTheirDurations) {
  Loop loop;
  std::vector<int> order;
  loop.block_on(ordered_sleeps(&order));
  ASSERT_EQ(order.size(), 20u);
  EXPECT_TRUE(std::is_sorted(order.begin(), order.end()));
}

// --- errors and the ready queue --------------------------------------------------------------

Task<int> open_or_throw(int dirfd, const char* path) {
  int fd = co_await core::openat(dirfd, path, O_RDONLY);
  layerd::check(fd, std::string("opening ") + path);
  co_return fd;
}

Task<std::string> error_crosses_await(int dirfd) {
  try {
    (void)co_await open_or_throw(dirfd, "nope");
  } catch (const layerd::Error& e) {
    co_return std::to_string(e.errno_value()) + ":" + e.what();
  }
  co_return "no exception";
}

TEST(Errors, ARingErrorBecomesAnExceptionAcrossCoAwait) {
  Loop loop;
  TempDir dir;
  std::string got = loop.block_on(error_crosses_await(dir.fd.get()));
  EXPECT_EQ(got.substr(0, got.find(':')), std::to_string(ENOENT));
  EXPECT_NE(got.find("opening nope"), std::string::npos) << got;
  EXPECT_THROW(loop.block_on(open_or_throw(dir.fd.get(), "nope")), layerd::Error);
}

// Observes its own CQE: whether complete() ran, and whether the awaiting coroutine was resumed
// while complete() was still on the stack.
struct Trace {
  bool cqe_seen = false;
  bool inside_complete = false;
  std::size_t ready_before = 0;
  std::size_t ready_after = 0;
};

class TracedNop final : public Op<TracedNop> {
 public:
  explicit TracedNop(Trace* trace) : trace_(trace) {}
  void complete(int result, std::uint32_t flags) noexcept override {
    Loop& loop = Loop::current();
    trace_->cqe_seen = true;
    trace_->inside_complete = true;
    trace_->ready_before = loop.ready_count();
    RingOp::complete(result, flags);
    trace_->ready_after = loop.ready_count();
    trace_->inside_complete = false;
  }

 private:
  void prepare(io_uring_sqe* sqe) override { io_uring_prep_nop(sqe); }
  Trace* trace_;
};

Task<void> traced(Trace* mine, Trace* other, bool* other_seen_at_resume) {
  TracedNop op(mine);
  EXPECT_EQ(co_await op, 0);
  EXPECT_TRUE(mine->cqe_seen);
  EXPECT_FALSE(mine->inside_complete);
  *other_seen_at_resume = other->cqe_seen;
}

Task<void> two_traced(Trace* a, Trace* b, bool* b_seen_when_a_resumed, bool* a_seen_when_b_resumed) {
  Scope scope;
  scope.spawn(traced(a, b, b_seen_when_a_resumed));
  scope.spawn(traced(b, a, a_seen_when_b_resumed));
  EXPECT_TRUE(co_await scope.join());
}

TEST(ReadyQueue, CompletionsPostAndNeverResumeInsideTheCqeWalk) {
  Loop loop;
  Trace a, b;
  bool b_seen = false, a_seen = false;
  loop.block_on(two_traced(&a, &b, &b_seen, &a_seen));
  // complete() only posted the waiter: the ready queue grew by one inside it.
  EXPECT_EQ(a.ready_after, a.ready_before + 1);
  EXPECT_EQ(b.ready_after, b.ready_before + 1);
  // Both nops were submitted together and completed in one walk: whichever coroutine resumed
  // first already saw the other's CQE, so nobody was resumed mid-walk.
  EXPECT_TRUE(b_seen);
  EXPECT_TRUE(a_seen);
}

Task<void> yield_records(int id, std::vector<int>* order) {
  order->push_back(id);
  co_await yield();
  order->push_back(id + 100);
}

Task<void> yields_interleave(std::vector<int>* order) {
  Scope scope;
  for (int i = 0; i < 3; ++i) scope.spawn(yield_records(i, order));
  EXPECT_TRUE(co_await scope.join());
}

TEST(ReadyQueue, YieldLetsOthersRunInFifoOrder) {
  Loop loop;
  std::vector<int> order;
  loop.block_on(yields_interleave(&order));
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 100, 101, 102}));
}

TEST(Loop, FeaturesAreProbed) {
  Loop loop;
  // Debian 12's 6.1 kernel has both; a fallback ring must still work.
  RecordProperty("single_issuer", loop.features().single_issuer);
  RecordProperty("defer_taskrun", loop.features().defer_taskrun);
  RecordProperty("ring_waitid", loop.features().ring_waitid);
  EXPECT_EQ(&Loop::current(), &loop);
}

TEST(Loop, WorksWithoutOptionalFlags) {
  Loop loop(LoopOptions{.try_single_issuer = false, .try_defer_taskrun = false,
                        .try_ring_waitid = false});
  EXPECT_FALSE(loop.features().single_issuer);
  EXPECT_FALSE(loop.features().ring_waitid);
  Pipe p;
  EXPECT_EQ(loop.block_on(pipe_round_trip(p.r.get(), p.w.get())), "hello ring");
}

}  // namespace

