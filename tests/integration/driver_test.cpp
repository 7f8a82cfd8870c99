// The driver with real fuse-overlayfs mounts (root and /dev/fuse needed; skipped otherwise).
// Every test checks content through the merged directory and that nothing is left behind.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/core/scope.hpp"
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

class DriverTest : public test::DriverFixture {
 protected:
  DriverTest() : DriverFixture("driver") {}
  std::string diff(const std::string& id) const { return diff_dir(id); }
};

TEST_F(DriverTest, LayoutMatchesTheSeedDriver) {
  create("base");
  create("child", "base", true);
  // HOME/ID/{diff,link}, plus work and lower for a child; l/LINK -> ../ID/diff.
  struct stat st {};
  // 0701 as Docker 20.10's driver makes them (CVE-2021-21284 fix).
  ASSERT_EQ(::stat((home_ + "/base").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0701u);
  ASSERT_EQ(::stat(diff("base").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0755u);
  const std::string base_link = read_file(home_ + "/base/link");
  EXPECT_EQ(base_link.size(), 26u);
  EXPECT_EQ(fs::read_symlink(home_ + "/l/" + base_link).string(), "../base/diff");
  EXPECT_FALSE(fs::exists(home_ + "/base/lower"));
  EXPECT_FALSE(fs::exists(home_ + "/base/work"));
  EXPECT_EQ(read_file(home_ + "/child/lower"), "l/" + base_link);
  EXPECT_TRUE(fs::is_directory(home_ + "/child/work"));
  // Creating a child marks the parent committed: its own mounts become read-only.
  EXPECT_TRUE(fs::exists(home_ + "/base/committed"));
  EXPECT_FALSE(fs::exists(home_ + "/child/committed"));

  auto meta = run(driver_->metadata("child"));
  EXPECT_EQ(meta["UpperDir"], home_ + "/child/diff");
  EXPECT_EQ(meta["WorkDir"], home_ + "/child/work");
  EXPECT_EQ(meta["MergedDir"], home_ + "/child/merged");
  EXPECT_EQ(meta["LowerDir"], home_ + "/base/diff");
  EXPECT_EQ(run(driver_->metadata("base")).count("LowerDir"), 0u);
}

TEST_F(DriverTest, BaseLayerGetReturnsItsDiffAndMountsNothing) {
  create("base");
  EXPECT_EQ(get("base"), diff("base"));
  EXPECT_EQ(test::mounts_under(dir_).size(), 0u);
  put("base");
  put("base");  // extra Puts are harmless
}

TEST_F(DriverTest, MergedViewShowsLowersUpperWinsWhiteoutsHideAndWritesCopyUp) {
  create("base");
  write_file(diff("base") + "/etc/hello", "from base\n");
  write_file(diff("base") + "/etc/shadowed", "base version\n");
  write_file(diff("base") + "/gone-aufs", "x");
  write_file(diff("base") + "/gone-chardev", "x");
  write_file(diff("base") + "/opaque/old", "old");
  write_file(diff("base") + "/kept/old", "old");
  create("mid", "base");
  write_file(diff("mid") + "/etc/shadowed", "mid version\n");
  write_file(diff("mid") + "/.wh.gone-aufs", "");
  ASSERT_EQ(::mknod((diff("mid") + "/gone-chardev").c_str(), S_IFCHR | 0000, makedev(0, 0)), 0);
  write_file(diff("mid") + "/opaque/.wh..wh..opq", "");
  write_file(diff("mid") + "/opaque/new", "new");
  create("top", "mid", true);

  const std::string merged = get("top");
  EXPECT_EQ(merged, home_ + "/top/merged");
  EXPECT_EQ(read_file(merged + "/etc/hello"), "from base\n");
  EXPECT_EQ(read_file(merged + "/etc/shadowed"), "mid version\n");
  EXPECT_FALSE(fs::exists(merged + "/gone-aufs"));
  EXPECT_FALSE(fs::exists(merged + "/gone-chardev"));
  EXPECT_FALSE(fs::exists(merged + "/opaque/old"));
  EXPECT_TRUE(fs::exists(merged + "/opaque/new"));
  EXPECT_TRUE(fs::exists(merged + "/kept/old"));

  write_file(merged + "/etc/hello", "changed in top\n");
  write_file(merged + "/added", "new file\n");
  EXPECT_EQ(read_file(diff("top") + "/etc/hello"), "changed in top\n");
  EXPECT_EQ(read_file(diff("top") + "/added"), "new file\n");
  EXPECT_EQ(read_file(diff("base") + "/etc/hello"), "from base\n");

  const auto* state = info("top");
  ASSERT_NE(state, nullptr);
  EXPECT_TRUE(state->mounted);
  EXPECT_EQ(state->refcount, 1);
  EXPECT_GT(state->server_pid, 0);
  EXPECT_TRUE(saw_event("mount top"));

  put("top");
  EXPECT_FALSE(fs::exists(merged));
  EXPECT_EQ(test::mounts_under(dir_).size(), 0u);
  EXPECT_TRUE(saw_event("unmount top"));
}

TEST_F(DriverTest, CommittedParentMountsReadOnly) {
  create("base");
  write_file(diff("base") + "/f", "base");
  create("mid", "base");
  write_file(diff("mid") + "/g", "mid");
  create("top", "mid");  // marks mid committed
  const std::string merged = get("mid");
  EXPECT_EQ(read_file(merged + "/f"), "base");
  EXPECT_EQ(read_file(merged + "/g"), "mid");
  int fd = ::open((merged + "/new").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  int err = errno;
  if (fd >= 0) ::close(fd);
  EXPECT_LT(fd, 0);
  EXPECT_EQ(err, EROFS);
  put("mid");
}

TEST_F(DriverTest, ChainOf128LowersMountsAnd129IsRefused) {
  create("layer0");
  write_file(diff("layer0") + "/bottom", "deepest");
  for (int i = 1; i <= 128; ++i) create("layer" + std::to_string(i), "layer" + std::to_string(i - 1));
  const std::string lowers = read_file(home_ + "/layer128/lower");
  EXPECT_EQ(std::count(lowers.begin(), lowers.end(), ':'), 127);
  auto listing_before = test::listing(home_);
  try {
    create("layer129", "layer128");
    FAIL() << "a 129th lower was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("max depth exceeded"), std::string::npos) << e.what();
  }
  EXPECT_EQ(test::listing(home_), listing_before);
  const std::string merged = get("layer128");
  EXPECT_EQ(read_file(merged + "/bottom"), "deepest");
  put("layer128");
}

core::Task<void> get_read_put_later(Driver& d, std::string id, std::vector<std::string>* dirs,
                                    int index) {
  (*dirs)[index] = co_await d.get(id, "");
}

TEST_F(DriverTest, TwoHundredConcurrentGetsAllReadableAndNothingLeaks) {
  create("base");
  write_file(diff("base") + "/shared", "shared");
  constexpr int kLayers = 200;
  for (int i = 0; i < kLayers; ++i) {
    create("c" + std::to_string(i), "base", true);
    write_file(diff("c" + std::to_string(i)) + "/own", std::to_string(i));
  }
  std::vector<std::string> dirs(kLayers);
  core::Scope scope;
  auto storm = [&]() -> core::Task<bool> {
    for (int i = 0; i < kLayers; ++i)
      scope.spawn(get_read_put_later(*driver_, "c" + std::to_string(i), &dirs, i));
    co_return co_await scope.join();
  };
  ASSERT_TRUE(run(storm()));
  EXPECT_EQ(scope.failed(), 0u);
  EXPECT_EQ(driver_->active_mounts(), static_cast<std::size_t>(kLayers));
  for (int i = 0; i < kLayers; ++i) {
    ASSERT_EQ(dirs[i], home_ + "/c" + std::to_string(i) + "/merged");
    EXPECT_EQ(read_file(dirs[i] + "/own"), std::to_string(i));
    EXPECT_EQ(read_file(dirs[i] + "/shared"), "shared");
  }
  EXPECT_EQ(test::fuse_servers_in(home_), static_cast<std::size_t>(kLayers));
  for (int i = 0; i < kLayers; ++i) put("c" + std::to_string(i));
  EXPECT_EQ(driver_->active_mounts(), 0u);
  EXPECT_EQ(test::mounts_under(dir_).size(), 0u);
  EXPECT_EQ(test::fuse_servers_in(home_), 0u);
}

TEST_F(DriverTest, RefcountsShareOneMount) {
  create("base");
  create("rw", "base", true);
  const std::string a = get("rw");
  const pid_t pid = info("rw")->server_pid;
  const std::string b = get("rw");
  EXPECT_EQ(a, b);
  EXPECT_EQ(info("rw")->refcount, 2);
  EXPECT_EQ(info("rw")->server_pid, pid);
  put("rw");
  EXPECT_TRUE(test::is_mounted(a));
  EXPECT_EQ(info("rw")->refcount, 1);
  put("rw");
  EXPECT_FALSE(test::is_mounted(a));
  EXPECT_FALSE(info("rw")->mounted);
  EXPECT_EQ(info("rw")->refcount, 0);
  EXPECT_EQ(info("rw")->parent, "base");
  put("rw");  // Put without Get: harmless
  EXPECT_FALSE(test::is_mounted(a));
}

TEST_F(DriverTest, RemoveWhileMountedUnmountsFirst) {
  create("base");
  create("rw", "base", true);
  const std::string merged = get("rw");
  run(driver_->remove("rw"));
  EXPECT_FALSE(test::is_mounted(merged));
  EXPECT_FALSE(fs::exists(home_ + "/rw"));
  EXPECT_FALSE(run(driver_->exists("rw")));
  EXPECT_EQ(test::fuse_servers_in(home_), 0u);
  // Its link is gone too: only base's remains.
  EXPECT_EQ(test::listing(home_ + "/l").size(), 1u);
}

TEST_F(DriverTest, BadInputIsRefusedAndChangesNothing) {
  create("base");
  const auto before = test::listing(dir_);
  const auto expect_error = [&](auto&& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "accepted; expected an error containing: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
          << "message: " << e.what() << " expected: " << needle;
    }
  };
  for (std::string bad : std::initializer_list<std::string>{"", "..", ".", "a/b", "../escape", std::string("nul\0x", 5),
                          std::string(300, 'x'), "l"}) {
    expect_error([&] { create(bad); }, "invalid layer id");
    expect_error([&] { get(bad); }, "invalid layer id");
    expect_error([&] { put(bad); }, "invalid layer id");
    expect_error([&] { run(driver_->remove(bad)); }, "invalid layer id");
    EXPECT_FALSE(run(driver_->exists(bad)));
  }
  expect_error([&] { create("orphan", "missing-parent"); }, "missing-parent");
  expect_error([&] { create("base"); }, "already exists");
  expect_error([&] { get("nope"); }, "nope");
  expect_error([&] { put("nope"); }, "nope");
  run(driver_->remove("nope"));  // as the seed: removing a missing layer succeeds
  expect_error([&] { run(driver_->metadata("nope")); }, "nope");
  expect_error([&] { run(driver_->create(CreateRequest{"x", "", "", {{"size", "10G"}}, false})); },
               "--storage-opt is not supported");
  EXPECT_EQ(test::listing(dir_), before);
}

TEST_F(DriverTest, DockerDataRootOpensAndMountsUnchanged) {
  // A home laid out by hand exactly as Docker's fuse-overlayfs driver writes it.
  stop_driver();
  const std::string docker_home = dir_ + "/docker-fuse-overlayfs";
  const std::string link_a = "ABCDEFGHIJKLMNOPQRSTUVWXY2";
  const std::string link_b = "ZYXWVUTSRQPONMLKJIHGFEDCB7";
  fs::create_directories(docker_home + "/l");
  fs::create_directories(docker_home + "/img/diff/bin");
  write_file(docker_home + "/img/diff/bin/tool", "docker wrote this");
  write_file(docker_home + "/img/link", link_a);
  write_file(docker_home + "/img/committed", "");
  fs::create_symlink("../img/diff", docker_home + "/l/" + link_a);
  fs::create_directories(docker_home + "/ctr/diff");
  fs::create_directories(docker_home + "/ctr/work");
  write_file(docker_home + "/ctr/link", link_b);
  write_file(docker_home + "/ctr/lower", "l/" + link_a);
  fs::create_symlink("../ctr/diff", docker_home + "/l/" + link_b);
  const auto before = test::listing(docker_home);

  start_driver(config());
  run(driver_->init(driver::InitRequest{docker_home, {}, {}, {}}));
  EXPECT_TRUE(run(driver_->exists("img")));
  const std::string merged = run(driver_->get("ctr", ""));
  EXPECT_EQ(merged, docker_home + "/ctr/merged");
  EXPECT_EQ(read_file(merged + "/bin/tool"), "docker wrote this");
  EXPECT_EQ(run(driver_->metadata("ctr"))["LowerDir"], docker_home + "/img/diff");
  put("ctr");
  // Unchanged but for what fuse-overlayfs keeps in its own work directory.
  auto after = test::listing(docker_home);
  after.erase(std::remove_if(after.begin(), after.end(),
                             [](const std::string& e) { return e.rfind("ctr/work/", 0) == 0; }),
              after.end());
  EXPECT_EQ(after, before);
}

TEST_F(DriverTest, InitIsIdempotentAndRefusesAnotherHomeWhileMounted) {
  create("base");
  create("rw", "base", true);
  run(driver_->init(driver::InitRequest{home_, {}, {}, {}}));
  const std::string merged = get("rw");
  run(driver_->init(driver::InitRequest{home_, {}, {}, {}}));  // a restarted dockerd
  EXPECT_TRUE(test::is_mounted(merged));
  try {
    run(driver_->init(driver::InitRequest{dir_ + "/other", {}, {}, {}}));
    FAIL() << "switched homes with a layer mounted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("still mounted"), std::string::npos) << e.what();
  }
  EXPECT_EQ(driver_->home(), home_);
  put("rw");
  run(driver_->init(driver::InitRequest{dir_ + "/other", {}, {}, {}}));
  EXPECT_EQ(driver_->home(), dir_ + "/other");
  EXPECT_FALSE(run(driver_->exists("base")));
}

TEST_F(DriverTest, StatusReportsUsefulPairs) {
  create("base");
  create("rw", "base", true);
  (void)get("rw");
  auto status = run(driver_->status());
  std::map<std::string, std::string> m(status.begin(), status.end());
  EXPECT_EQ(m["Home"], home_);
  EXPECT_EQ(m["Layers"], "2");
  EXPECT_EQ(m["Active Mounts"], "1");
  EXPECT_FALSE(m["Backing Filesystem"].empty());
  EXPECT_NE(m["fuse-overlayfs"].find("1."), std::string::npos) << m["fuse-overlayfs"];
  put("rw");
}

core::Task<void> wait_for(core::Loop&, std::function<bool()> condition) {
  for (int i = 0; i < 500 && !condition(); ++i) (void)co_await core::sleep(10ms);
}

TEST_F(DriverTest, ExternalUnmountIsNoticedAndHealedWhileHeld) {
  create("base");
  write_file(diff("base") + "/f", "content");
  create("rw", "base", true);
  const std::string merged = get("rw");
  const pid_t first_pid = info("rw")->server_pid;
  ASSERT_EQ(::umount2(merged.c_str(), MNT_DETACH), 0);
  run(wait_for(*loop_, [&] {
    const auto* l = info("rw");
    return l && l->mounted && l->server_pid != first_pid && l->server_pid != 0;
  }));
  EXPECT_TRUE(wait_until([&] { return saw_event("remount rw"); }));
  EXPECT_EQ(read_file(merged + "/f"), "content");
  EXPECT_EQ(info("rw")->refcount, 1);
  put("rw");
}

TEST_F(DriverTest, KilledServerIsDetectedAndRemounted) {
  create("base");
  write_file(diff("base") + "/f", "content");
  create("rw", "base", true);
  const std::string merged = get("rw");
  for (int round = 0; round < 5; ++round) {
    const pid_t pid = info("rw")->server_pid;
    ASSERT_GT(pid, 0);
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    run(wait_for(*loop_, [&] {
      const auto* l = info("rw");
      return l && l->mounted && l->server_pid != pid && l->server_pid != 0;
    }));
    ASSERT_NE(info("rw")->server_pid, pid) << "round " << round;
    EXPECT_EQ(read_file(merged + "/f"), "content");
    EXPECT_FALSE(test::process_exists(pid));  // reaped, no zombie
  }
  // The metric follows the remount a moment later (the heal finishes after the mount is up).
  EXPECT_TRUE(wait_until([&] { return driver_->metrics().remounts >= 5u; }))
      << driver_->metrics().remounts;
  put("rw");
}

TEST_F(DriverTest, MountsSurviveARestartWithTheirRefcounts) {
  create("base");
  write_file(diff("base") + "/f", "survives");
  create("rw", "base", true);
  const std::string merged = get("rw");
  (void)get("rw");
  const pid_t pid = info("rw")->server_pid;
  // Stop without unmounting, as layerd does on SIGTERM by default.
  loop_->block_on(driver_->shutdown());
  driver_.reset();
  EXPECT_TRUE(test::is_mounted(merged));
  EXPECT_EQ(read_file(merged + "/f"), "survives");

  start_driver(config());
  const auto* adopted = info("rw");
  ASSERT_NE(adopted, nullptr);
  EXPECT_TRUE(adopted->mounted);
  EXPECT_EQ(adopted->refcount, 2);
  EXPECT_EQ(adopted->server_pid, pid);
  put("rw");
  EXPECT_TRUE(test::is_mounted(merged));
  put("rw");
  EXPECT_FALSE(test::is_mounted(merged));
  EXPECT_FALSE(test::process_exists(pid));
}

TEST_F(DriverTest, RestartReturnsToTheHomeOfTheLastInit) {
  // dockerd sends Init (with its own home) only when it starts: a restarted layerd must serve
  // that home again, not its default one.
  const std::string docker_home = dir_ + "/docker-home";
  run(driver_->init(driver::InitRequest{docker_home, {}, {}, {}}));
  create("base");
  write_file(docker_home + "/base/diff/f", "in the Init home");
  create("rw", "base", true);
  const std::string merged = get("rw");
  const pid_t pid = info("rw")->server_pid;
  loop_->block_on(driver_->shutdown());
  driver_.reset();

  start_driver(config());  // default home: home_
  EXPECT_EQ(driver_->home(), docker_home);
  EXPECT_TRUE(run(driver_->exists("base")));
  const auto* adopted = info("rw");
  ASSERT_NE(adopted, nullptr);
  EXPECT_TRUE(adopted->mounted);
  EXPECT_EQ(adopted->server_pid, pid);
  EXPECT_EQ(read_file(merged + "/f"), "in the Init home");
  put("rw");
  EXPECT_FALSE(test::is_mounted(merged));

  // A recorded home that no longer exists falls back to the default one.
  stop_driver();
  fs::remove_all(docker_home);
  start_driver(config());
  EXPECT_EQ(driver_->home(), home_);
}

}  // namespace
