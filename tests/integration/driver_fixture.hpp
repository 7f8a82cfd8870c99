// A Driver on its own loop, home and run directory, with real fuse-overlayfs mounts: the base of
// the driver, supervision and diff integration tests. Skips without root or /dev/fuse. Tear-down
// releases what a test still holds and checks that nothing is left: no mount under the test's
// directory and no FUSE server serving its home.
#pragma once

#include <sys/mount.h>

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "layerd/core/loop.hpp"
#include "layerd/core/ops.hpp"
#include "layerd/driver/driver.hpp"
#include "test_support.hpp"

namespace layerd::test {

class DriverFixture : public ::testing::Test {
 protected:
  explicit DriverFixture(std::string name) : name_(std::move(name)) {}

  void SetUp() override {
    if (auto reason = fuse_unavailable_reason()) GTEST_SKIP() << *reason;
    dir_ = make_temp_dir("layerd-" + name_);
    home_ = dir_ + "/home";
    run_ = dir_ + "/run";
    loop_ = std::make_unique<core::Loop>();
    start_driver(config());
  }

  void TearDown() override {
    if (!loop_) return;
    stop_driver();
    EXPECT_EQ(mounts_under(dir_), std::vector<std::string>{});
    EXPECT_EQ(fuse_servers_in(home_), 0u);
    for (const auto& m : mounts_under(dir_)) (void)::umount2(m.c_str(), MNT_DETACH);
    loop_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // The configuration tests start with: the test's home and run directory.
  driver::DriverConfig config() const {
    driver::DriverConfig c;
    c.default_home = home_;
    c.run_dir = run_;
    return c;
  }

  void start_driver(const driver::DriverConfig& c) {
    driver_ = std::make_unique<driver::Driver>(c);
    driver_->subscribe([this](const driver::Event& e) { events_.push_back(e.type + " " + e.layer); });
    run(driver_->start());
  }

  // Releases what is still held (the last Put unmounts), then stops the driver.
  void stop_driver() {
    if (!driver_) return;
    expect_mount_count_consistent();
    for (const auto& layer : driver_->layers())
      for (int i = 0; i < layer.refcount; ++i) put(layer.id);
    run(driver_->shutdown());
    driver_.reset();
  }

  // Stops the driver without releasing anything (as SIGTERM leaves mounts) and starts a new one.
  void restart(const driver::DriverConfig& c) {
    run(driver_->shutdown());
    driver_.reset();
    start_driver(c);
  }

  template <typename T>
  T run(core::Task<T> task) {
    return loop_->block_on(std::move(task));
  }

  void create(const std::string& id, const std::string& parent = "", bool rw = false) {
    run(driver_->create(driver::CreateRequest{id, parent, "", {}, rw}));
  }
  std::string get(const std::string& id) {
    std::string dir = run(driver_->get(id, ""));
    expect_mount_count_consistent();
    return dir;
  }
  void put(const std::string& id) {
    run(driver_->put(id));
    expect_mount_count_consistent();
  }

  // active_mounts() is a count kept as mounts come and go (the health route reads it): it must
  // agree with the layers' own mounted flags after whatever the test did.
  void expect_mount_count_consistent() {
    std::size_t mounted = 0;
    for (const auto& layer : driver_->layers()) mounted += layer.mounted ? 1 : 0;
    EXPECT_EQ(driver_->active_mounts(), mounted);
  }
  std::string diff_dir(const std::string& id) const { return home_ + "/" + id + "/diff"; }

  const driver::LayerInfo* info(const std::string& id) {
    layers_ = driver_->layers();
    for (const auto& l : layers_)
      if (l.id == id) return &l;
    return nullptr;
  }

  // Runs the loop until `condition` holds or about 5 s have passed; returns whether it held.
  bool wait_until(const std::function<bool()>& condition) {
    for (int i = 0; i < 1000; ++i) {
      if (condition()) return true;
      run(pause(std::chrono::milliseconds(5)));
    }
    return condition();
  }

  bool saw_event(const std::string& text) const {
    for (const auto& e : events_)
      if (e == text) return true;
    return false;
  }

  std::string name_, dir_, home_, run_;
  std::unique_ptr<core::Loop> loop_;
  std::unique_ptr<driver::Driver> driver_;
  std::vector<std::string> events_;
  std::vector<driver::LayerInfo> layers_;

 private:
  static core::Task<void> pause(std::chrono::milliseconds d) { (void)co_await core::sleep(d); }
};

}  // namespace layerd::test
