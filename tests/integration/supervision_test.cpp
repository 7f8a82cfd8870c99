// Supervision with real mounts and real signals: dead FUSE servers healed, unmounts behind
// layerd's back noticed, restarts adopting mounts, and a seeded random model check.
#include <signal.h>
#include <sys/mount.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/driver/driver.hpp"
#include "layerd/sys/error.hpp"
#include "driver_fixture.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
using namespace layerd;
using namespace std::chrono_literals;
using driver::CreateRequest;
using driver::Driver;
using test::read_file;
using test::write_file;

namespace {

core::Task<void> sleep_for(std::chrono::milliseconds d) { (void)co_await core::sleep(d); }

class SupervisionTest : public test::DriverFixture {
 protected:
  SupervisionTest() : DriverFixture("supervision") {}

  driver::DriverConfig with(driver::HealPolicy policy,
                            const std::string& fuse_overlayfs = "fuse-overlayfs") const {
    driver::DriverConfig c = config();
    c.heal_policy = policy;
    c.fuse_overlayfs = fuse_overlayfs;
    return c;
  }
  void start(driver::HealPolicy policy = driver::HealPolicy::kRemount,
             const std::string& fuse_overlayfs = "fuse-overlayfs") {
    start_driver(with(policy, fuse_overlayfs));
  }
  void restart(driver::HealPolicy policy = driver::HealPolicy::kRemount) {
    DriverFixture::restart(with(policy));
  }

  void make_pair(const std::string& id) {
    if (!run(driver_->exists("base"))) {
      run(driver_->create(CreateRequest{"base", "", "", {}, false}));
      write_file(home_ + "/base/diff/file", "payload");
    }
    run(driver_->create(CreateRequest{id, "base", "", {}, true}));
  }
};

TEST_F(SupervisionTest, KilledServerHealsOneHundredTimes) {
  make_pair("rw");
  const std::string merged = run(driver_->get("rw", ""));
  std::vector<double> heal_ms;
  for (int round = 0; round < 100; ++round) {
    const pid_t pid = info("rw")->server_pid;
    ASSERT_GT(pid, 0);
    const auto killed_at = std::chrono::steady_clock::now();
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    ASSERT_TRUE(wait_until([&] {
      const auto* l = info("rw");
      return l && l->mounted && l->server_pid != pid && l->server_pid != 0;
    })) << "round " << round;
    ASSERT_EQ(read_file(merged + "/file"), "payload") << "round " << round;
    heal_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - killed_at)
            .count());
    EXPECT_FALSE(test::process_exists(pid));
    EXPECT_EQ(test::mounts_under(home_).size(), 1u);
  }
  EXPECT_EQ(info("rw")->refcount, 1);
  // The metric follows the remount a moment later (the heal finishes after the mount is up).
  EXPECT_TRUE(wait_until([&] { return driver_->metrics().remounts >= 100u; }))
      << driver_->metrics().remounts;
  std::sort(heal_ms.begin(), heal_ms.end());
  std::printf("kill -9 to readable remount: p50 %.2f ms, p99 %.2f ms, max %.2f ms (100 rounds)\n",
              heal_ms[49], heal_ms[98], heal_ms[99]);
  run(driver_->put("rw"));
}

TEST_F(SupervisionTest, FailPolicyMarksFailedAndTheNextGetMounts) {
  restart(driver::HealPolicy::kMarkFailed);
  make_pair("rw");
  const std::string merged = run(driver_->get("rw", ""));
  const pid_t pid = info("rw")->server_pid;
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  ASSERT_TRUE(wait_until([&] { return info("rw") && info("rw")->state == "failed"; }));
  EXPECT_FALSE(info("rw")->mounted);
  EXPECT_FALSE(info("rw")->last_error.empty());
  EXPECT_FALSE(test::is_mounted(merged));  // the dead mount was detached: no ENOTCONN left
  EXPECT_EQ(run(driver_->get("rw", "")), merged);
  EXPECT_EQ(read_file(merged + "/file"), "payload");
  EXPECT_EQ(info("rw")->refcount, 2);
  run(driver_->put("rw"));
  run(driver_->put("rw"));
  EXPECT_FALSE(test::is_mounted(merged));
}

TEST_F(SupervisionTest, ExternalUnmountOfAHeldLayerIsRemounted) {
  make_pair("rw");
  const std::string merged = run(driver_->get("rw", ""));
  ASSERT_EQ(::umount2(merged.c_str(), MNT_DETACH), 0);
  ASSERT_TRUE(wait_until([&] {
    return std::count(events_.begin(), events_.end(), "remount rw") == 1;
  }));
  EXPECT_EQ(read_file(merged + "/file"), "payload");
  run(driver_->put("rw"));
  EXPECT_FALSE(test::is_mounted(merged));
}

TEST_F(SupervisionTest, StoppedServerDoesNotHangTheLoop) {
  make_pair("slow");
  make_pair("other");
  const std::string merged = run(driver_->get("slow", ""));
  const pid_t pid = info("slow")->server_pid;
  ASSERT_EQ(::kill(pid, SIGSTOP), 0);
  // Other layers keep working while one server is frozen.
  const auto started = std::chrono::steady_clock::now();
  const std::string other = run(driver_->get("other", ""));
  EXPECT_EQ(read_file(other + "/file"), "payload");
  run(driver_->put("other"));
  EXPECT_LT(std::chrono::steady_clock::now() - started, 5s);
  EXPECT_TRUE(info("slow")->mounted);
  ASSERT_EQ(::kill(pid, SIGCONT), 0);
  EXPECT_EQ(read_file(merged + "/file"), "payload");
  EXPECT_EQ(info("slow")->server_pid, pid);
  run(driver_->put("slow"));
}

TEST_F(SupervisionTest, RestartAdoptsLiveServersAndRemountsDeadOnes) {
  make_pair("live");
  make_pair("dead");
  make_pair("unheld");
  const std::string live = run(driver_->get("live", ""));
  const std::string dead = run(driver_->get("dead", ""));
  (void)run(driver_->get("dead", ""));
  const pid_t live_pid = info("live")->server_pid;
  const pid_t dead_pid = info("dead")->server_pid;
  run(driver_->shutdown());
  driver_.reset();
  // While layerd is down: one server dies, and a stray mount appears under the home that no
  // record explains (as if layerd crashed between mounting and recording).
  ASSERT_EQ(::kill(dead_pid, SIGKILL), 0);
  for (int i = 0; i < 200 && test::process_exists(dead_pid); ++i) ::usleep(5000);
  fs::create_directories(home_ + "/unheld/merged");
  ASSERT_EQ(::mount("tmpfs", (home_ + "/unheld/merged").c_str(), "tmpfs", 0, nullptr), 0);

  start();
  const auto* adopted = info("live");
  ASSERT_NE(adopted, nullptr);
  EXPECT_EQ(adopted->server_pid, live_pid);
  EXPECT_EQ(adopted->refcount, 1);
  const auto* healed = info("dead");
  ASSERT_NE(healed, nullptr);
  EXPECT_TRUE(healed->mounted);
  EXPECT_NE(healed->server_pid, dead_pid);
  EXPECT_EQ(healed->refcount, 2);
  EXPECT_EQ(read_file(live + "/file"), "payload");
  EXPECT_EQ(read_file(dead + "/file"), "payload");
  EXPECT_FALSE(test::is_mounted(home_ + "/unheld/merged"));
  // An adopted server is not our child: its death is still seen (pidfd poll) and healed.
  ASSERT_EQ(::kill(live_pid, SIGKILL), 0);
  ASSERT_TRUE(wait_until([&] {
    const auto* l = info("live");
    return l && l->mounted && l->server_pid != live_pid && l->server_pid != 0;
  }));
  EXPECT_EQ(read_file(live + "/file"), "payload");
  run(driver_->put("live"));
  run(driver_->put("dead"));
  run(driver_->put("dead"));
  EXPECT_EQ(test::mounts_under(home_).size(), 0u);
}

// A FUSE server that exits before mounting: Get fails with the server's own stderr.
TEST_F(SupervisionTest, EarlyExitIsAnErrorCarryingTheServersStderr) {
  const std::string fake = dir_ + "/broken-fuse-overlayfs";
  write_file(fake, "#!/bin/sh\necho 'fuse: device not found, try modprobe fuse first' >&2\nexit 1\n");
  ASSERT_EQ(::chmod(fake.c_str(), 0755), 0);
  run(driver_->shutdown());
  driver_.reset();
  start(driver::HealPolicy::kRemount, fake);
  make_pair("rw");
  try {
    (void)run(driver_->get("rw", ""));
    FAIL() << "a server that exited was taken for a mount";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("exited with code 1"), std::string::npos) << message;
    EXPECT_NE(message.find("device not found, try modprobe fuse first"), std::string::npos)
        << message;
  }
  EXPECT_FALSE(fs::exists(home_ + "/rw/merged"));
  EXPECT_FALSE(info("rw")->mounted);
  EXPECT_EQ(info("rw")->refcount, 0);
}

// A server that keeps dying: remounts are retried with backoff, then the layer is marked failed
// with the last error (the server's stderr).
TEST_F(SupervisionTest, ServerThatKeepsDyingIsMarkedFailedAfterRetries) {
  // The first start is a real fuse-overlayfs; every later one fails at once.
  const std::string flaky = dir_ + "/flaky-fuse-overlayfs";
  const std::string count = dir_ + "/starts";
  write_file(flaky, "#!/bin/sh\n[ \"$1\" = --version ] && exec fuse-overlayfs --version\necho x >> " + count +
                        "\nif [ $(wc -l < " + count + ") -gt 1 ]; then echo 'cannot mount: "
                        "simulated crash' >&2; exit 3; fi\nexec fuse-overlayfs \"$@\"\n");
  ASSERT_EQ(::chmod(flaky.c_str(), 0755), 0);
  run(driver_->shutdown());
  driver_.reset();
  start(driver::HealPolicy::kRemount, flaky);
  make_pair("rw");
  const std::string merged = run(driver_->get("rw", ""));
  const pid_t pid = info("rw")->server_pid;
  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  ASSERT_TRUE(wait_until([&] { return info("rw")->state == "failed"; }));
  // Four attempts: at once, then after 100, 200 and 400 ms.
  EXPECT_GE(std::chrono::steady_clock::now() - killed_at, 650ms);
  const std::string starts = read_file(count);
  EXPECT_EQ(std::count(starts.begin(), starts.end(), '\n'), 1 + 4);
  EXPECT_NE(info("rw")->last_error.find("simulated crash"), std::string::npos)
      << info("rw")->last_error;
  EXPECT_FALSE(test::is_mounted(merged));  // no dead mount left behind
  EXPECT_EQ(info("rw")->refcount, 1);      // still held: the holder's Put is still owed
  run(driver_->put("rw"));
  EXPECT_EQ(info("rw")->refcount, 0);
}

// `rm -rf` of a held layer's merged directory (what a careless cleanup script does): rm walks
// into the mount and deletes through it, then cannot remove the busy mountpoint. The mount
// stays, layerd keeps serving it, and nothing hangs.
TEST_F(SupervisionTest, RmRfOfAMergedDirectoryIsSurvived) {
  make_pair("rw");
  const std::string merged = run(driver_->get("rw", ""));
  const pid_t pid = info("rw")->server_pid;
  EXPECT_NE(std::system(("rm -rf " + merged + " 2>/dev/null").c_str()), 0);
  run(sleep_for(100ms));
  EXPECT_TRUE(test::is_mounted(merged));
  EXPECT_TRUE(info("rw")->mounted);
  EXPECT_EQ(info("rw")->server_pid, pid);
  // The deletion went through the mount: the lower file is whited out in the upper dir.
  EXPECT_FALSE(fs::exists(merged + "/file"));
  EXPECT_TRUE(fs::exists(home_ + "/base/diff/file"));
  write_file(merged + "/again", "writable");
  EXPECT_EQ(read_file(home_ + "/rw/diff/again"), "writable");
  run(driver_->put("rw"));
  EXPECT_FALSE(test::is_mounted(merged));
}

// --unmount-on-exit: Cleanup and shutdown unmount everything, as Docker's own driver does;
// without it (the default, tested above) mounts outlive layerd.
TEST_F(SupervisionTest, UnmountOnExitLeavesNoMountBehind) {
  make_pair("rw");
  make_pair("other");
  run(driver_->shutdown());
  driver::DriverConfig c;
  c.default_home = home_;
  c.run_dir = dir_ + "/run";
  c.unmount_on_exit = true;
  driver_ = std::make_unique<Driver>(c);
  run(driver_->start());
  const std::string a = run(driver_->get("rw", ""));
  const std::string b = run(driver_->get("other", ""));
  (void)run(driver_->get("other", ""));
  run(driver_->cleanup());  // dockerd's Cleanup at its shutdown
  EXPECT_FALSE(test::is_mounted(a));
  EXPECT_FALSE(test::is_mounted(b));
  EXPECT_EQ(test::fuse_servers_in(home_), 0u);
  (void)run(driver_->get("rw", ""));
  run(driver_->shutdown());  // SIGTERM's path
  driver_.reset();
  EXPECT_FALSE(test::is_mounted(a));
  EXPECT_EQ(test::fuse_servers_in(home_), 0u);
  EXPECT_EQ(test::mounts_under(home_).size(), 0u);
  start();
  EXPECT_EQ(driver_->active_mounts(), 0u);  // nothing to adopt
}

// A seeded random walk over Create/Get/Put/Remove/kill/restart on 50 layers, checked after
// every step against a model: which layers exist, each refcount, what is mounted.
TEST_F(SupervisionTest, RandomOperationsMatchTheModel) {
  std::mt19937 rng(20261128);
  constexpr int kLayers = 50;
  constexpr int kSteps = 2000;
  run(driver_->create(CreateRequest{"base", "", "", {}, false}));
  write_file(home_ + "/base/diff/file", "payload");
  std::map<std::string, int> model;  // existing layer -> refcount
  auto name = [](int i) { return "L" + std::to_string(i); };
  for (int step = 0; step < kSteps; ++step) {
    const std::string id = name(static_cast<int>(rng() % kLayers));
    const int action = static_cast<int>(rng() % 100);
    const bool exists = model.count(id) > 0;
    SCOPED_TRACE("step " + std::to_string(step) + " action " + std::to_string(action) + " " + id);
    if (action < 20) {
      if (exists) {
        EXPECT_THROW(run(driver_->create(CreateRequest{id, "base", "", {}, true})), Error);
      } else {
        run(driver_->create(CreateRequest{id, "base", "", {}, true}));
        model[id] = 0;
      }
    } else if (action < 55) {
      if (exists) {
        const std::string dir = run(driver_->get(id, ""));
        ASSERT_EQ(read_file(dir + "/file"), "payload");
        ++model[id];
      } else {
        EXPECT_THROW(run(driver_->get(id, "")), Error);
      }
    } else if (action < 85) {
      if (exists) {
        run(driver_->put(id));
        if (model[id] > 0) --model[id];
      }
    } else if (action < 93) {
      if (exists) {
        run(driver_->remove(id));
        model.erase(id);
      }
    } else if (action < 98) {
      if (exists && model[id] > 0) {
        const pid_t pid = info(id)->server_pid;
        ASSERT_GT(pid, 0);
        ASSERT_EQ(::kill(pid, SIGKILL), 0);
        ASSERT_TRUE(wait_until([&] {
          const auto* l = info(id);
          return l && l->mounted && l->server_pid != pid && l->server_pid != 0;
        }));
      }
    } else {
      restart();
    }
    // The model and the driver agree.
    for (const auto& [layer, refs] : model) {
      const auto* l = info(layer);
      if (refs == 0) {
        EXPECT_TRUE(l == nullptr || !l->mounted) << layer;
      } else {
        ASSERT_NE(l, nullptr) << layer;
        EXPECT_EQ(l->refcount, refs) << layer;
        EXPECT_TRUE(l->mounted) << layer;
      }
    }
    std::size_t held = 0;
    for (const auto& [layer, refs] : model) held += refs > 0 ? 1 : 0;
    ASSERT_EQ(driver_->active_mounts(), held);
    if (step % 100 == 0) ASSERT_EQ(test::mounts_under(home_).size(), held);
  }
  for (auto& [layer, refs] : model)
    while (refs-- > 0) run(driver_->put(layer));
  EXPECT_EQ(test::mounts_under(home_).size(), 0u);
}

}  // namespace
