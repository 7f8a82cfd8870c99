// MountWatcher and InotifyWatcher against real mounts (tmpfs via mount(2), root only) and real
// directories. Coroutines are free functions (no capturing lambda coroutines).
#include <sys/inotify.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "layerd/core/cancel.hpp"
#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
#include "layerd/watch/watch.hpp"

using namespace layerd;
using namespace std::chrono_literals;
using core::CancelSource;
using core::Task;

namespace {

std::string make_temp_dir() {
  char tmpl[] = "/tmp/layerd-watch-test-XXXXXX";
  if (!::mkdtemp(tmpl)) return {};
  return tmpl;
}

bool mount_tmpfs(const std::string& at) {
  return ::mount("tmpfs", at.c_str(), "tmpfs", 0, "size=1m") == 0;
}

// Resolves when `done()` holds, or false after `limit`.
template <typename Pred>
Task<bool> eventually(Pred done, std::chrono::milliseconds limit) {
  for (auto waited = 0ms; waited < limit; waited += 5ms) {
    if (done()) co_return true;
    (void)co_await core::sleep(5ms);
  }
  co_return done();
}

struct WaitResult {
  bool finished = false;
  bool mounted = false;
};

Task<void> wait_for_mount(watch::MountWatcher& w, std::string mp, CancelSource* cancel,
                          WaitResult& out) {
  out.mounted = co_await w.wait_mounted(std::move(mp), cancel);
  out.finished = true;
}

struct MountScenario {
  std::string mp;
  std::vector<std::string> unmounted;
  bool appeared = false;
  bool appeared_before_call = false;
  bool disappeared = false;
  bool cancelled_false = false;
  bool waiter_pending_before_mount = false;
  bool stale_entry_ignored = false;
};

Task<void> mount_scenario(watch::MountWatcher& w, CancelSource& stop, MountScenario& s) {
  core::Scope scope;
  // Let run() open its fd and take its first snapshot.
  (void)co_await core::sleep(20ms);

  // 1. A waiter armed before the mount resolves true once it appears.
  WaitResult r1;
  CancelSource c1;
  scope.spawn(wait_for_mount(w, s.mp, &c1, r1));
  (void)co_await core::sleep(20ms);
  s.waiter_pending_before_mount = !r1.finished;
  if (mount_tmpfs(s.mp)) {
    s.appeared = co_await eventually([&r1] { return r1.finished; }, 3000ms) && r1.mounted;

    // 2. on_unmount fires for the mount point when it goes away behind our back.
    (void)::umount2(s.mp.c_str(), 0);
    s.disappeared = co_await eventually(
        [&s] {
          for (const auto& m : s.unmounted)
            if (m == s.mp) return true;
          return false;
        },
        3000ms);

    // 3. A mount made just before the call (the table has not seen it yet) is not missed.
    if (mount_tmpfs(s.mp)) {
      WaitResult r2;
      CancelSource c2;
      scope.spawn(wait_for_mount(w, s.mp, &c2, r2));
      s.appeared_before_call =
          co_await eventually([&r2] { return r2.finished; }, 3000ms) && r2.mounted;
      if (!r2.finished) c2.cancel();

      // 4. The table still lists the mount just unmounted (no re-read yet): a waiter armed now
      // must not take that stale entry for a new mount (a Get right after a Put of the same
      // layer would answer before its server had mounted).
      (void)::umount2(s.mp.c_str(), MNT_DETACH);
      WaitResult r4;
      CancelSource c4;
      scope.spawn(wait_for_mount(w, s.mp, &c4, r4));
      (void)co_await core::sleep(50ms);
      s.stale_entry_ignored = !r4.finished;
      c4.cancel();
      (void)co_await eventually([&r4] { return r4.finished; }, 1000ms);
      s.stale_entry_ignored = s.stale_entry_ignored && r4.finished && !r4.mounted;
    }
  }
  if (!r1.finished) c1.cancel();

  // 5. Cancellation resolves false.
  WaitResult r3;
  CancelSource c3;
  scope.spawn(wait_for_mount(w, s.mp + "/never", &c3, r3));
  (void)co_await core::sleep(10ms);
  c3.cancel();
  s.cancelled_false = co_await eventually([&r3] { return r3.finished; }, 1000ms) && !r3.mounted;

  (void)co_await scope.join();
  stop.cancel();
}

TEST(MountWatcher, SeesMountsAppearAndDisappear) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to mount tmpfs";
  std::string dir = make_temp_dir();
  ASSERT_FALSE(dir.empty());
  MountScenario s;
  s.mp = dir + "/mnt point";  // a space: exercises the \040 escape end to end
  ASSERT_EQ(::mkdir(s.mp.c_str(), 0755), 0);
  {
    core::Loop loop;
    watch::MountTable table;
    watch::MountWatcher watcher(table);
    watcher.watch_prefix(dir);
    watcher.on_unmount([&s](const std::string& mp) { s.unmounted.push_back(mp); });
    CancelSource stop;
    core::Scope background;
    background.spawn(watcher.run(stop));
    loop.block_on(mount_scenario(watcher, stop, s));
    EXPECT_TRUE(loop.block_on(background.join()));
    EXPECT_EQ(background.failed(), 0u);
    EXPECT_FALSE(watcher.running());
    EXPECT_GE(watcher.changes_seen(), 2u);
  }
  (void)::umount2(s.mp.c_str(), MNT_DETACH);
  ::rmdir(s.mp.c_str());
  ::rmdir(dir.c_str());

  EXPECT_TRUE(s.waiter_pending_before_mount);
  EXPECT_TRUE(s.appeared);
  EXPECT_TRUE(s.disappeared);
  EXPECT_TRUE(s.appeared_before_call);
  EXPECT_TRUE(s.stale_entry_ignored);
  EXPECT_TRUE(s.cancelled_false);
}

struct PrefixScenario {
  std::string watched_mp;
  std::string other_mp;
  std::vector<std::string> unmounted;
  bool ok = false;
};

Task<void> prefix_scenario(watch::MountWatcher& w, CancelSource& stop, PrefixScenario& s) {
  (void)co_await core::sleep(20ms);
  if (mount_tmpfs(s.watched_mp) && mount_tmpfs(s.other_mp)) {
    (void)co_await w.refresh_now();
    (void)::umount2(s.other_mp.c_str(), 0);
    (void)::umount2(s.watched_mp.c_str(), 0);
    s.ok = co_await eventually([&s] { return !s.unmounted.empty(); }, 3000ms);
    (void)co_await core::sleep(50ms);
  }
  stop.cancel();
}

TEST(MountWatcher, ReportsOnlyWatchedPrefixes) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to mount tmpfs";
  std::string dir = make_temp_dir();
  ASSERT_FALSE(dir.empty());
  PrefixScenario s;
  ASSERT_EQ(::mkdir((dir + "/watched").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((dir + "/other").c_str(), 0755), 0);
  s.watched_mp = dir + "/watched";
  s.other_mp = dir + "/other";
  {
    core::Loop loop;
    watch::MountTable table;
    watch::MountWatcher watcher(table);
    watcher.watch_prefix(dir + "/watched/");
    watcher.on_unmount([&s](const std::string& mp) { s.unmounted.push_back(mp); });
    CancelSource stop;
    core::Scope background;
    background.spawn(watcher.run(stop));
    loop.block_on(prefix_scenario(watcher, stop, s));
    EXPECT_TRUE(loop.block_on(background.join()));
  }
  (void)::umount2(s.watched_mp.c_str(), MNT_DETACH);
  (void)::umount2(s.other_mp.c_str(), MNT_DETACH);
  ::rmdir(s.watched_mp.c_str());
  ::rmdir(s.other_mp.c_str());
  ::rmdir(dir.c_str());
  EXPECT_TRUE(s.ok);
  EXPECT_EQ(s.unmounted, std::vector<std::string>{s.watched_mp});
}

struct StopScenario {
  WaitResult pending;
  WaitResult existing;
};

Task<void> stop_scenario(watch::MountWatcher& w, CancelSource& stop, StopScenario& s) {
  core::Scope scope;
  (void)co_await core::sleep(20ms);
  // Already in the table: resolves at once.
  scope.spawn(wait_for_mount(w, "/", nullptr, s.existing));
  // Never mounted, no cancel source: resolves false when the watcher stops.
  scope.spawn(wait_for_mount(w, "/nonexistent/layerd/mountpoint", nullptr, s.pending));
  (void)co_await core::sleep(20ms);
  stop.cancel();
  (void)co_await scope.join();
}

TEST(MountWatcher, StoppingReleasesWaiters) {
  core::Loop loop;
  watch::MountTable table;
  watch::MountWatcher watcher(table);
  CancelSource stop;
  core::Scope background;
  background.spawn(watcher.run(stop));
  StopScenario s;
  loop.block_on(stop_scenario(watcher, stop, s));
  EXPECT_TRUE(loop.block_on(background.join()));
  EXPECT_EQ(background.failed(), 0u);
  EXPECT_TRUE(s.existing.finished);
  EXPECT_TRUE(s.existing.mounted);
  EXPECT_TRUE(s.pending.finished);
  EXPECT_FALSE(s.pending.mounted);
}

struct InotifyScenario {
  std::vector<std::pair<int, std::uint32_t>> events;
  bool saw(int wd, std::uint32_t bit) const {
    for (const auto& [w, m] : events)
      if (w == wd && (m & bit)) return true;
    return false;
  }
};

Task<void> await_event(InotifyScenario& s, int wd, std::uint32_t bit, CancelSource& stop,
                       bool& seen) {
  seen = co_await eventually([&s, wd, bit] { return s.saw(wd, bit); }, 3000ms);
  stop.cancel();
}

TEST(InotifyWatcher, ReportsDeleteSelfOnRmdir) {
  std::string dir = make_temp_dir();
  ASSERT_FALSE(dir.empty());
  std::string target = dir + "/merged";
  ASSERT_EQ(::mkdir(target.c_str(), 0755), 0);
  core::Loop loop;
  watch::InotifyWatcher inotify;
  EXPECT_EQ(inotify.add(dir + "/missing", IN_DELETE_SELF), -ENOENT);
  int wd = inotify.add(target, IN_UNMOUNT | IN_DELETE_SELF);
  ASSERT_GE(wd, 0);
  InotifyScenario s;
  CancelSource stop;
  core::Scope background;
  background.spawn(inotify.run(stop, [&s](int w, std::uint32_t m) { s.events.emplace_back(w, m); }));
  ASSERT_EQ(::rmdir(target.c_str()), 0);
  bool seen = false;
  loop.block_on(await_event(s, wd, IN_DELETE_SELF, stop, seen));
  EXPECT_TRUE(loop.block_on(background.join()));
  EXPECT_EQ(background.failed(), 0u);
  EXPECT_TRUE(seen);
  EXPECT_TRUE(s.saw(wd, IN_IGNORED));
  ::rmdir(dir.c_str());
}

TEST(InotifyWatcher, ReportsUnmountOnUmount) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to mount tmpfs";
  std::string dir = make_temp_dir();
  ASSERT_FALSE(dir.empty());
  std::string mp = dir + "/merged";
  ASSERT_EQ(::mkdir(mp.c_str(), 0755), 0);
  ASSERT_TRUE(mount_tmpfs(mp));
  core::Loop loop;
  watch::InotifyWatcher inotify;
  // While mounted, the path resolves to the mounted root: the watch sits on that filesystem.
  int wd = inotify.add(mp, IN_UNMOUNT | IN_DELETE_SELF);
  ASSERT_GE(wd, 0);
  InotifyScenario s;
  CancelSource stop;
  core::Scope background;
  background.spawn(inotify.run(stop, [&s](int w, std::uint32_t m) { s.events.emplace_back(w, m); }));
  ASSERT_EQ(::umount2(mp.c_str(), 0), 0);
  bool seen = false;
  loop.block_on(await_event(s, wd, IN_UNMOUNT, stop, seen));
  EXPECT_TRUE(loop.block_on(background.join()));
  EXPECT_TRUE(seen);
  ::rmdir(mp.c_str());
  ::rmdir(dir.c_str());
}

}  // namespace
