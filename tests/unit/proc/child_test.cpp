// proc::Child with real processes: exit codes, signals, stderr capture under heavy output, many
// children at once, missing binaries, deadlines, adoption of a non-child, cancellation, and no
// zombies or fds left behind. Every waiting test runs on both wait paths: IORING_OP_WAITID and
// the pidfd poll + waitid(P_PIDFD) fallback.
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/proc/child.hpp"
#include "layerd/sys/error.hpp"

using namespace layerd;
using namespace layerd::core;
using namespace std::chrono_literals;
using proc::Child;
using proc::ExitStatus;
using proc::SpawnOptions;
using proc::Stdio;

namespace {

int count_open_fds() {
  int n = 0;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  while (dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n - 1;  // the directory stream's own fd
}

bool proc_entry_exists(pid_t pid) {
  return ::access(("/proc/" + std::to_string(pid)).c_str(), F_OK) == 0;
}

// True when `pid` is not a child of ours waiting to be reaped (no zombie left).
bool not_our_zombie(pid_t pid) {
  siginfo_t info{};
  return ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG) < 0 && errno == ECHILD;
}

SpawnOptions shell(const std::string& script) {
  return SpawnOptions{.argv = {"/bin/sh", "-c", script}};
}

Task<void> wait_into(Child* child, std::optional<ExitStatus>* out) {
  *out = co_await child->wait();
}

Task<std::optional<ExitStatus>> wait_with_deadline(Child* child, std::chrono::nanoseconds d) {
  CancelSource cancel;
  Deadline timer(cancel, d);
  co_return co_await child->wait(&cancel);
}

class ChildTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    loop_.emplace(LoopOptions{.try_ring_waitid = GetParam()});
    if (GetParam() && !loop_->features().ring_waitid)
      GTEST_SKIP() << "kernel lacks IORING_OP_WAITID (Linux 6.7): ring path not testable";
  }
  void TearDown() override { loop_.reset(); }

  std::optional<ExitStatus> wait(Child& child) { return loop_->block_on(child.wait()); }

  std::optional<Loop> loop_;
};

TEST(ExitStatus, Describes) {
  EXPECT_EQ((ExitStatus{.exited = true, .code = 1}).describe(), "exited with code 1");
  EXPECT_EQ((ExitStatus{.exited = false, .signal = 9}).describe(), "killed by signal 9 (Killed)");
  EXPECT_EQ(ExitStatus{}.describe(), "exited (status unknown)");
  EXPECT_TRUE((ExitStatus{.exited = true, .code = 0}).success());
  EXPECT_FALSE((ExitStatus{.exited = true, .code = 2}).success());
  EXPECT_FALSE(ExitStatus{}.success());
}

TEST_P(ChildTest, ReportsExitCodes) {
  Child ok = Child::spawn({.argv = {"/bin/true"}});
  EXPECT_TRUE(ok.is_own_child());
  EXPECT_GE(ok.pidfd(), 0);
  auto status = wait(ok);
  ASSERT_TRUE(status);
  EXPECT_TRUE(status->success());
  EXPECT_TRUE(ok.exited());

  Child bad = Child::spawn({.argv = {"false"}});  // through PATH
  status = wait(bad);
  ASSERT_TRUE(status);
  EXPECT_EQ(*status, (ExitStatus{.exited = true, .code = 1}));

  Child seven = Child::spawn(shell("exit 7"));
  status = wait(seven);
  ASSERT_TRUE(status);
  EXPECT_EQ(status->code, 7);
  EXPECT_EQ(status->describe(), "exited with code 7");
  // A second wait returns the same status at once.
  EXPECT_EQ(wait(seven), status);
}

TEST_P(ChildTest, ReportsDeathBySignal) {
  Child child = Child::spawn(shell("kill -9 $$"));
  auto status = wait(child);
  ASSERT_TRUE(status);
  EXPECT_FALSE(status->exited);
  EXPECT_EQ(status->signal, SIGKILL);
  EXPECT_EQ(status->describe(), "killed by signal 9 (Killed)");
}

TEST_P(ChildTest, SignalReachesARunningChild) {
  Child child = Child::spawn({.argv = {"sleep", "30"}});
  EXPECT_EQ(child.signal(0), 0);
  EXPECT_EQ(child.signal(SIGTERM), 0);
  auto status = wait(child);
  ASSERT_TRUE(status);
  EXPECT_EQ(status->signal, SIGTERM);
  // Reaped: the pidfd now answers ESRCH instead of signalling whoever reuses the pid.
  EXPECT_EQ(child.signal(SIGTERM), -ESRCH);
}

TEST_P(ChildTest, CapturesStderrUpToTheLimitWithoutBlockingTheChild) {
  // 8 MiB is far beyond a pipe buffer: the child only finishes if the pipe is drained.
  SpawnOptions options = shell("printf 'first words\\n' >&2; head -c 8388608 /dev/zero >&2; exit 3");
  options.capture_limit = 1000;
  auto start = Clock::now();
  Child child = Child::spawn(options);
  auto status = wait(child);
  ASSERT_TRUE(status);
  EXPECT_EQ(status->code, 3);
  EXPECT_LT(Clock::now() - start, 20s);
  ASSERT_EQ(child.captured_stderr().size(), 1000u);
  EXPECT_EQ(child.captured_stderr().substr(0, 12), "first words\n");
  EXPECT_EQ(child.stderr_dropped(), 12 + 8388608u - 1000u);
}

TEST_P(ChildTest, CapturesStdoutAndStderrSeparately) {
  SpawnOptions options = shell("echo out; echo err >&2");
  options.stdout_mode = Stdio::kCapture;
  Child child = Child::spawn(options);
  ASSERT_TRUE(wait(child));
  EXPECT_EQ(child.captured_stdout(), "out\n");
  EXPECT_EQ(child.captured_stderr(), "err\n");
}

TEST_P(ChildTest, GrandchildHoldingThePipeDoesNotDelayTheWait) {
  // The background sleep inherits the stderr pipe: waiting for EOF would take 30 s.
  SpawnOptions options = shell("sleep 30 & echo $!; echo early >&2");
  options.stdout_mode = Stdio::kCapture;
  auto start = Clock::now();
  Child child = Child::spawn(options);
  auto status = wait(child);
  ASSERT_TRUE(status);
  EXPECT_TRUE(status->success());
  EXPECT_LT(Clock::now() - start, 10s);
  EXPECT_EQ(child.captured_stderr(), "early\n");
  pid_t grandchild = std::atoi(child.captured_stdout().c_str());
  ASSERT_GT(grandchild, 0);
  (void)::kill(grandchild, SIGKILL);
}

TEST_P(ChildTest, AwaitsFiveHundredChildrenAtOnce) {
  // 500 children, each with a pidfd and a capture pipe: make sure the fd limit allows it.
  rlimit limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &limit), 0);
  if (limit.rlim_cur < 4096 && limit.rlim_max > limit.rlim_cur) {
    limit.rlim_cur = std::min<rlim_t>(limit.rlim_max, 4096);
    ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &limit), 0);
  }
  constexpr int kChildren = 500;
  std::vector<std::unique_ptr<Child>> children;
  std::vector<std::optional<ExitStatus>> statuses(kChildren);
  for (int i = 0; i < kChildren; ++i) {
    // The sleep keeps them all alive at once, so the waits really overlap.
    children.push_back(std::make_unique<Child>(Child::spawn(shell(
        "echo child " + std::to_string(i) + " >&2; sleep 1; exit " + std::to_string(i % 7)))));
  }
  Scope scope;
  for (int i = 0; i < kChildren; ++i) scope.spawn(wait_into(children[i].get(), &statuses[i]));
  loop_->block_on(scope.join());
  for (int i = 0; i < kChildren; ++i) {
    ASSERT_TRUE(statuses[i]) << i;
    EXPECT_EQ(*statuses[i], (ExitStatus{.exited = true, .code = i % 7})) << i;
    EXPECT_EQ(children[i]->captured_stderr(), "child " + std::to_string(i) + "\n");
    EXPECT_TRUE(not_our_zombie(children[i]->pid()));
  }
}

TEST_P(ChildTest, WaitIsCancellable) {
  Child child = Child::spawn({.argv = {"sleep", "30"}});
  auto start = Clock::now();
  EXPECT_EQ(loop_->block_on(wait_with_deadline(&child, 100ms)), std::nullopt);
  EXPECT_LT(Clock::now() - start, 5s);
  EXPECT_FALSE(child.exited());

  // Already cancelled: returns at once.
  CancelSource cancelled;
  cancelled.cancel();
  EXPECT_EQ(loop_->block_on(child.wait(&cancelled)), std::nullopt);

  // Still ours to wait for after the cancelled waits.
  EXPECT_EQ(child.signal(SIGKILL), 0);
  auto status = wait(child);
  ASSERT_TRUE(status);
  EXPECT_EQ(status->signal, SIGKILL);
}

TEST_P(ChildTest, CaptureResumesAfterACancelledWait) {
  // Writes 1 MiB after the first wait was cancelled: a later wait must drain it again.
  SpawnOptions options = shell("sleep 0.3; head -c 1048576 /dev/zero >&2; echo end >&2");
  options.capture_limit = 1 << 21;
  Child child = Child::spawn(options);
  EXPECT_EQ(loop_->block_on(wait_with_deadline(&child, 50ms)), std::nullopt);
  auto status = wait(child);
  ASSERT_TRUE(status);
  EXPECT_TRUE(status->success());
  EXPECT_EQ(child.captured_stderr().size(), 1048576u + 4);
}

TEST_P(ChildTest, LeavesNoZombie) {
  Child child = Child::spawn({.argv = {"/bin/true"}});
  pid_t pid = child.pid();
  ASSERT_TRUE(wait(child));
  EXPECT_FALSE(proc_entry_exists(pid));
  EXPECT_TRUE(not_our_zombie(pid));
}

TEST_P(ChildTest, RunKillsAtTheDeadline) {
  auto start = Clock::now();
  proc::RunResult result =
      loop_->block_on(proc::run(shell("echo started >&2; exec sleep 30"), 300ms));
  EXPECT_TRUE(result.timed_out);
  EXPECT_EQ(result.status.signal, SIGKILL);
  EXPECT_EQ(result.stderr_text, "started\n");
  EXPECT_LT(Clock::now() - start, 10s);

  result = loop_->block_on(proc::run(shell("echo fine >&2; exit 4"), 10s));
  EXPECT_FALSE(result.timed_out);
  EXPECT_EQ(result.status.code, 4);
  EXPECT_EQ(result.stderr_text, "fine\n");
}

TEST_P(ChildTest, AdoptsANonChild) {
  // The shell backgrounds a sleep in a new session and exits: the sleep is re-parented away
  // from us, like a FUSE server left by a previous layerd.
  SpawnOptions options = shell("sleep 30 </dev/null >/dev/null 2>&1 & echo $!");
  options.stdout_mode = Stdio::kCapture;
  options.new_session = true;
  Child launcher = Child::spawn(options);
  ASSERT_TRUE(wait(launcher));
  pid_t pid = std::atoi(launcher.captured_stdout().c_str());
  ASSERT_GT(pid, 0);

  long long start_time = proc::process_start_time(pid);
  ASSERT_GT(start_time, 0);
  Child adopted = Child::adopt(pid, start_time);
  EXPECT_FALSE(adopted.is_own_child());
  EXPECT_EQ(adopted.pid(), pid);
  try {
    (void)Child::adopt(pid, start_time + 1);
    ADD_FAILURE() << "a wrong start time must be refused";
  } catch (const Error& e) {
    EXPECT_EQ(e.errno_value(), ESRCH);
  }

  EXPECT_EQ(loop_->block_on(wait_with_deadline(&adopted, 100ms)), std::nullopt);
  EXPECT_EQ(adopted.signal(SIGKILL), 0);
  auto status = wait(adopted);
  ASSERT_TRUE(status);
  // Not our child: the exit status goes to its parent.
  EXPECT_EQ(*status, ExitStatus{});
}

TEST_P(ChildTest, AdoptOfOurOwnChildReapsIt) {
  Child spawned = Child::spawn({.argv = {"sleep", "30"}});
  Child adopted = Child::adopt(spawned.pid());
  EXPECT_TRUE(adopted.is_own_child());
  EXPECT_EQ(adopted.signal(SIGTERM), 0);
  auto status = wait(adopted);
  ASSERT_TRUE(status);
  EXPECT_EQ(status->signal, SIGTERM);
  EXPECT_TRUE(not_our_zombie(spawned.pid()));
}

TEST_P(ChildTest, SpawnsWithEnvCwdAndFds) {
  char path[] = "/tmp/layerd-proc-log-XXXXXX";
  int log = ::mkostemp(path, O_CLOEXEC);
  ASSERT_GE(log, 0);
  ::unlink(path);
  SpawnOptions options = shell("echo $FOO; pwd; echo to-log >&2");
  options.env = {"PATH=/usr/bin:/bin", "FOO=bar"};
  options.cwd = "/tmp";
  options.stdout_mode = Stdio::kCapture;
  options.stderr_mode = Stdio::kFd;
  options.stderr_fd = log;
  Child child = Child::spawn(options);
  ASSERT_TRUE(wait(child));
  EXPECT_EQ(child.captured_stdout(), "bar\n/tmp\n");
  EXPECT_EQ(child.captured_stderr(), "");
  char buf[64] = {};
  EXPECT_EQ(::pread(log, buf, sizeof buf - 1, 0), 7);
  EXPECT_STREQ(buf, "to-log\n");
  ::close(log);
}

TEST_P(ChildTest, ChildStartsWithCleanSignalState) {
  // layerd blocks signals for its signalfd and ignores SIGPIPE: children must not inherit that.
  sigset_t blocked, old;
  sigemptyset(&blocked);
  sigaddset(&blocked, SIGTERM);
  sigaddset(&blocked, SIGCHLD);
  ASSERT_EQ(::pthread_sigmask(SIG_BLOCK, &blocked, &old), 0);
  struct sigaction ignore {}, old_pipe {};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGPIPE, &ignore, &old_pipe), 0);

  SpawnOptions options{.argv = {"/bin/cat", "/proc/self/status"}};
  options.stdout_mode = Stdio::kCapture;
  Child child = Child::spawn(options);
  auto status = wait(child);

  ::sigaction(SIGPIPE, &old_pipe, nullptr);
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  ASSERT_TRUE(status);
  const std::string& text = child.captured_stdout();
  EXPECT_NE(text.find("SigBlk:\t0000000000000000\n"), std::string::npos) << text;
  // glibc's posix_spawn itself leaves its two internal signals (32, 33: thread cancellation
  // and setxid) ignored; every classic signal must be at its default.
  std::size_t ignored_at = text.find("SigIgn:\t");
  ASSERT_NE(ignored_at, std::string::npos) << text;
  unsigned long long ignored = std::stoull(text.substr(ignored_at + 8, 16), nullptr, 16);
  EXPECT_EQ(ignored & 0x7fffffffULL, 0u) << text;  // bit n-1 is signal n
}

TEST_P(ChildTest, NewSessionDetachesTheChild) {
  SpawnOptions options{.argv = {"/bin/cat", "/proc/self/stat"}};
  options.stdout_mode = Stdio::kCapture;
  options.new_session = true;
  Child child = Child::spawn(options);
  ASSERT_TRUE(wait(child));
  // Field 6 is the session id: a session leader's own pid.
  const std::string& stat = child.captured_stdout();
  std::string rest = stat.substr(stat.rfind(')') + 2);
  std::vector<std::string> fields;
  for (std::size_t pos = 0; pos < rest.size();) {
    std::size_t end = rest.find(' ', pos);
    if (end == std::string::npos) end = rest.size();
    fields.push_back(rest.substr(pos, end - pos));
    pos = end + 1;
  }
  ASSERT_GT(fields.size(), 4u);
  EXPECT_EQ(std::stoi(fields[3]), child.pid());
}

core::Task<int> offload_once() { co_return co_await core::offload([] { return 1; }); }

TEST_P(ChildTest, LeaksNoFds) {
  // run() spawns on the loop's offload pool, which keeps an eventfd from its first use on:
  // start it before counting.
  ASSERT_EQ(loop_->block_on(offload_once()), 1);
  int before = count_open_fds();
  ASSERT_GT(before, 0);
  {
    SpawnOptions options = shell("echo out; echo err >&2; exit 2");
    options.stdout_mode = Stdio::kCapture;
    for (int i = 0; i < 20; ++i) {
      Child child = Child::spawn(options);
      ASSERT_TRUE(wait(child));
    }
    Child cancelled = Child::spawn({.argv = {"sleep", "30"}});
    EXPECT_EQ(loop_->block_on(wait_with_deadline(&cancelled, 20ms)), std::nullopt);
    (void)cancelled.signal(SIGKILL);
    ASSERT_TRUE(wait(cancelled));
    (void)loop_->block_on(proc::run(shell("exec sleep 30"), 50ms));
    EXPECT_THROW((void)Child::spawn({.argv = {"layerd-no-such-program"}}), Error);
    EXPECT_THROW((void)Child::spawn({.argv = {"/bin/true"}, .cwd = "/nonexistent-dir"}), Error);
  }
  EXPECT_EQ(count_open_fds(), before);
}

INSTANTIATE_TEST_SUITE_P(WaitPaths, ChildTest, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "RingWaitid" : "PollFallback";
                         });

TEST(ChildSpawn, MissingBinaryIsAClearError) {
  try {
    (void)Child::spawn({.argv = {"fuse-overlayfs-not-installed", "-f"}});
    FAIL() << "spawn of a missing program succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.errno_value(), ENOENT);
    EXPECT_NE(std::string(e.what()).find("fuse-overlayfs-not-installed: command not found"),
              std::string::npos)
        << e.what();
  }
  try {
    (void)Child::spawn({.argv = {"/nonexistent/bin/tool"}});
    FAIL() << "spawn of a missing path succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.errno_value(), ENOENT);
    EXPECT_NE(std::string(e.what()).find("/nonexistent/bin/tool"), std::string::npos) << e.what();
  }
  // Not on the PATH given in env, although it is on ours.
  try {
    (void)Child::spawn({.argv = {"true"}, .env = {"PATH=/nonexistent"}});
    FAIL() << "PATH of env ignored";
  } catch (const Error& e) {
    EXPECT_EQ(e.errno_value(), ENOENT);
  }
}

TEST(ChildSpawn, MissingCwdNamesIt) {
  try {
    (void)Child::spawn({.argv = {"/bin/true"}, .cwd = "/nonexistent-cwd"});
    FAIL() << "spawn in a missing directory succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.errno_value(), ENOENT);
    EXPECT_NE(std::string(e.what()).find("/nonexistent-cwd"), std::string::npos) << e.what();
  }
}

TEST(ChildSpawn, RejectsBadOptions) {
  EXPECT_THROW((void)Child::spawn({}), Error);
  EXPECT_THROW((void)Child::spawn({.argv = {"/bin/true"}, .stdout_mode = Stdio::kFd}), Error);
  EXPECT_THROW((void)Child::spawn({.argv = {"/bin/true"}, .stdin_mode = Stdio::kCapture}), Error);
}

TEST(ChildSpawn, DestructorReapsAnExitedChild) {
  pid_t pid;
  {
    Child child = Child::spawn({.argv = {"/bin/true"}, .stderr_mode = Stdio::kNull});
    pid = child.pid();
    pollfd exited{.fd = child.pidfd(), .events = POLLIN, .revents = 0};
    ASSERT_EQ(::poll(&exited, 1, 10000), 1);
  }
  EXPECT_TRUE(not_our_zombie(pid));
}

TEST(ChildSpawn, AdoptOfAMissingProcessThrows) {
  // A reaped child's pid is free (until reused, which cannot happen this fast in practice).
  Child child = Child::spawn({.argv = {"/bin/true"}});
  pid_t pid = child.pid();
  {
    Loop loop;
    ASSERT_TRUE(loop.block_on(child.wait()));
  }
  try {
    (void)Child::adopt(pid);
    FAIL() << "adopt of a reaped pid succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.errno_value(), ESRCH);
  }
}

TEST(ProcessStartTime, ReadsProcStat) {
  long long own = proc::process_start_time(::getpid());
  EXPECT_GT(own, 0);
  EXPECT_EQ(proc::process_start_time(::getpid()), own);
  EXPECT_EQ(proc::process_start_time(0x3ffffff0), -ENOENT);
}

}  // namespace
