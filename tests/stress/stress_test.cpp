// Stress tests of a real layerd over its socket: mount storms with random Get/Put interleavings,
// the same storm while FUSE servers are killed, and 1,000 concurrent control connections while
// mounts churn. Each test starts its own layerd (path in $LAYERD_BIN) on a temp root, socket and
// run dir, drives it from many blocking keep-alive clients on their own threads (independent of
// layerd's loop), and checks the end state from outside: the mount table, /proc, layerd's fd
// count and GET /v1/layers.
//
// Size: $LAYERD_STRESS_SCALE (default 1) multiplies every count; CI runs the default (at least
// 300 concurrent mounts, 1,000 control connections), e.g. LAYERD_STRESS_SCALE=4 for a heavier run.
#include <dirent.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "http_client.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
using nlohmann::json;
using layerd::tools::UnixHttpClient;
using namespace std::chrono_literals;

namespace {

int scale() {
  const char* s = std::getenv("LAYERD_STRESS_SCALE");
  int v = s != nullptr ? std::atoi(s) : 1;
  return std::max(1, v);
}

std::string temp_root() {
  // tmpfs when there is one: deleting thousands of layer dirs on the ext4 root slows file
  // creation for everyone on the machine for a minute (see BENCHMARKING.md).
  std::string base = fs::is_directory("/dev/shm") ? "/dev/shm" : "/tmp";
  std::string templ = base + "/layerd-stress-XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  return templ;
}

std::size_t fd_count(pid_t pid) {
  std::size_t n = 0;
  if (DIR* d = ::opendir(fmt::format("/proc/{}/fd", pid).c_str())) {
    while (dirent* e = ::readdir(d)) {
      if (e->d_name[0] != '.') ++n;
    }
    ::closedir(d);
  }
  return n;
}

using layerd::test::fuse_server_pids;

// Failures seen by worker threads, reported once at the end of a test.
class Failures {
 public:
  void add(std::string what) {
    std::lock_guard lock(mu_);
    ++count_;
    if (list_.size() < 20) list_.push_back(std::move(what));
  }
  [[nodiscard]] std::size_t count() const {
    std::lock_guard lock(mu_);
    return count_;
  }
  [[nodiscard]] std::string summary() const {
    std::lock_guard lock(mu_);
    std::string s = fmt::format("{} failures", count_);
    for (const auto& f : list_) s += "\n  " + f;
    return s;
  }

 private:
  mutable std::mutex mu_;
  std::size_t count_ = 0;
  std::vector<std::string> list_;
};

struct Answer {
  int status = 0;
  json body;
  std::string error;  // transport failure, or the Err field
  [[nodiscard]] bool ok() const { return error.empty() && status == 200; }
};

Answer call(UnixHttpClient& client, std::string_view method, const json& args) {
  Answer a;
  try {
    layerd::tools::HttpResponse r = client.request(layerd::tools::plugin_request(method, args));
    a.status = r.status;
    a.body = json::parse(r.body, nullptr, false);
    if (a.body.is_object() && a.body.contains("Err") && a.body["Err"].is_string() &&
        !a.body["Err"].get<std::string>().empty()) {
      a.error = a.body["Err"].get<std::string>();
    } else if (r.status != 200) {
      a.error = fmt::format("http {}: {}", r.status, r.body.substr(0, 120));
    } else if (a.body.is_discarded()) {
      a.error = "malformed JSON: " + r.body.substr(0, 120);
    }
  } catch (const std::exception& e) {
    a.error = std::string("transport: ") + e.what();
  }
  return a;
}

json get_json(UnixHttpClient& client, const std::string& target) {
  layerd::tools::HttpRequest req;
  req.method = "GET";
  req.target = target;
  layerd::tools::HttpResponse r = client.request(req);
  if (r.status != 200) throw std::runtime_error(fmt::format("GET {}: http {}", target, r.status));
  return json::parse(r.body);
}

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  if (!f) return "<cannot open: " + std::string(std::strerror(errno)) + ">";
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// One layer of the test's chains.
struct Layer {
  std::string id;
  std::string parent;
  std::vector<std::string> ancestors;  // nearest parent first
};

// A real layerd on a temp root, socket and run dir.
class Daemon {
 public:
  Daemon() : dir_(temp_root()) {
    const char* bin = std::getenv("LAYERD_BIN");
    if (bin == nullptr) throw std::runtime_error("LAYERD_BIN is not set");
    root_ = dir_ + "/root";
    socket_ = dir_ + "/layerd.sock";
    std::string run = dir_ + "/run";
    std::string log = dir_ + "/layerd.log";
    pid_ = ::fork();
    if (pid_ == 0) {
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::execl(bin, bin, "--root", root_.c_str(), "--socket", socket_.c_str(), "--run-dir", run.c_str(),
              "--log-level", std::getenv("LAYERD_STRESS_LOG") != nullptr ? std::getenv("LAYERD_STRESS_LOG") : "warn", "--unmount-on-exit", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    auto deadline = std::chrono::steady_clock::now() + 10s;
    for (;;) {
      try {
        UnixHttpClient c(socket_, 2s);
        (void)get_json(c, "/v1/health");
        break;
      } catch (const std::exception& e) {
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) == pid_) {
          pid_ = -1;
          throw std::runtime_error("layerd exited at start: " + slurp(log));
        }
        if (std::chrono::steady_clock::now() > deadline) throw;
        std::this_thread::sleep_for(20ms);
      }
    }
  }

  // SIGTERM, then the exit status (a wait status; -1 if it had to be killed).
  int stop() {
    if (pid_ <= 0) return -1;
    ::kill(pid_, SIGTERM);
    int status = 0;
    pid_t r = 0;
    for (int i = 0; i < 200 && (r = ::waitpid(pid_, &status, WNOHANG)) == 0; ++i) std::this_thread::sleep_for(50ms);
    if (r == 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
      status = -1;
    }
    pid_ = -1;
    return status;
  }

  ~Daemon() {
    (void)stop();
    // Never delete a tree with a live mount inside (it would delete through the mount).
    for (const auto& m : layerd::test::mounts_under(root_)) ::umount2(m.c_str(), MNT_DETACH);
    for (pid_t p : fuse_server_pids(root_)) ::kill(p, SIGKILL);
    if (layerd::test::mounts_under(root_).empty() && std::getenv("LAYERD_STRESS_KEEP") == nullptr) {
      std::error_code ec;
      fs::remove_all(dir_, ec);
    }
  }

  [[nodiscard]] const std::string& socket() const { return socket_; }
  [[nodiscard]] const std::string& root() const { return root_; }
  [[nodiscard]] pid_t pid() const { return pid_; }
  [[nodiscard]] std::string log() const { return slurp(dir_ + "/layerd.log"); }

  // layerd's fd count once it is stable (connections just closed take a moment to be reaped).
  [[nodiscard]] std::size_t settled_fds(std::size_t target, std::chrono::milliseconds wait = 5s) const {
    auto deadline = std::chrono::steady_clock::now() + wait;
    std::size_t n = fd_count(pid_);
    while (n > target && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(20ms);
      n = fd_count(pid_);
    }
    return n;
  }

 private:
  std::string dir_;
  std::string root_;
  std::string socket_;
  pid_t pid_ = -1;
};

// Chains of depth 2 or 3 (random) until `mountable` layers have a parent (only those mount).
// Every layer gets a file `layer-<id>` in its diff directory, so a mount can be checked for the
// files of every layer of its chain.
std::vector<Layer> make_chains(Daemon& d, const std::string& prefix, int mountable, std::mt19937& rng,
                               Failures& failures) {
  std::vector<std::vector<Layer>> chains;
  int with_parent = 0;
  while (with_parent < mountable) {
    int depth = std::uniform_int_distribution<int>(2, 3)(rng);
    std::vector<Layer> chain;
    for (int i = 0; i < depth; ++i) {
      Layer l;
      l.id = fmt::format("{}-c{}-d{}", prefix, chains.size(), i);
      if (i > 0) {
        l.parent = chain.back().id;
        l.ancestors.push_back(l.parent);
        for (const auto& a : chain.back().ancestors) l.ancestors.push_back(a);
        ++with_parent;
      }
      chain.push_back(l);
    }
    chains.push_back(std::move(chain));
  }
  // Chains are created concurrently from 16 connections, each chain in order.
  std::atomic<std::size_t> next{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&] {
      UnixHttpClient c(d.socket(), 60s);
      for (std::size_t i = next++; i < chains.size(); i = next++) {
        for (const auto& l : chains[i]) {
          Answer a = call(c, "Create", layerd::tools::layer_args(l.id, l.parent));
          if (!a.ok()) failures.add(fmt::format("Create {}: {}", l.id, a.error));
          std::ofstream(d.root() + "/" + l.id + "/diff/layer-" + l.id) << l.id;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  std::vector<Layer> all;
  for (auto& c : chains) all.insert(all.end(), c.begin(), c.end());
  return all;
}

// Reads every chain file through a mounted layer's directory; empty when all are right.
std::string check_content(const Layer& l, const std::string& dir) {
  std::vector<std::string> ids = l.ancestors;
  ids.push_back(l.id);
  for (const auto& id : ids) {
    std::string got = slurp(dir + "/layer-" + id);
    if (got != id) return fmt::format("{}: layer-{} reads '{}'", dir, id, got);
  }
  return {};
}

json layers_by_id(UnixHttpClient& c) {
  json out = json::object();
  json all = get_json(c, "/v1/layers");  // named: a temporary would die before the loop body
  for (const auto& l : all["layers"]) out[l["id"].get<std::string>()] = l;
  return out;
}

// The storm's work: every mountable layer is held once (a Get kept until the release phase);
// besides, random Get..Put pairs on the same layers race with the holds from other connections.
struct StormResult {
  std::map<std::string, std::string> held;  // layer -> Dir of its hold
  std::size_t gets = 0;
  std::size_t failed_gets = 0;
};

struct Op {
  enum Kind { kHold, kPair } kind;
  const Layer* layer;
  int pairs = 1;
  int pause_us = 0;
};

StormResult storm_hold(Daemon& d, const std::vector<const Layer*>& mountable, int connections,
                       std::mt19937& rng, Failures& failures, bool tolerate_failed_gets) {
  std::vector<Op> ops;
  for (const Layer* l : mountable) {
    ops.push_back({Op::kHold, l});
    if (std::bernoulli_distribution(0.7)(rng)) {
      ops.push_back({Op::kPair, l, std::uniform_int_distribution<int>(1, 3)(rng),
                     std::uniform_int_distribution<int>(0, 3000)(rng)});
    }
  }
  std::shuffle(ops.begin(), ops.end(), rng);
  std::vector<std::vector<Op>> per_thread(connections);
  for (std::size_t i = 0; i < ops.size(); ++i) per_thread[i % connections].push_back(ops[i]);

  std::mutex mu;
  StormResult result;
  std::barrier start(connections);
  std::vector<std::thread> threads;
  for (int t = 0; t < connections; ++t) {
    threads.emplace_back([&, t] {
      UnixHttpClient c(d.socket(), 120s);
      try {
        c.connect();
      } catch (const std::exception& e) {
        failures.add(fmt::format("connect: {}", e.what()));
      }
      start.arrive_and_wait();
      for (const Op& op : per_thread[t]) {
        const std::string& id = op.layer->id;
        std::string expect_dir = d.root() + "/" + id + "/merged";
        if (op.kind == Op::kHold) {
          Answer a = call(c, "Get", layerd::tools::layer_args(id));
          std::lock_guard lock(mu);
          ++result.gets;
          if (!a.ok()) {
            ++result.failed_gets;
            if (!tolerate_failed_gets) failures.add(fmt::format("Get {}: {}", id, a.error));
            else if (result.failed_gets <= 3) std::fprintf(stderr, "tolerated: Get %s: %s\n", id.c_str(), a.error.c_str());
            continue;
          }
          if (a.body.value("Dir", "") != expect_dir) {
            failures.add(fmt::format("Get {}: Dir {} (expected {})", id, a.body.dump(), expect_dir));
          }
          result.held[id] = a.body.value("Dir", "");
          continue;
        }
        for (int p = 0; p < op.pairs; ++p) {
          Answer g = call(c, "Get", layerd::tools::layer_args(id));
          {
            std::lock_guard lock(mu);
            ++result.gets;
            if (!g.ok()) ++result.failed_gets;
          }
          if (!g.ok()) {
            if (!tolerate_failed_gets) failures.add(fmt::format("Get (pair) {}: {}", id, g.error));
            continue;  // a failed Get holds nothing: no Put
          }
          if (g.body.value("Dir", "") != expect_dir) failures.add(fmt::format("Get (pair) {}: {}", id, g.body.dump()));
          if (op.pause_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(op.pause_us));
          Answer r = call(c, "Put", layerd::tools::layer_args(id));
          if (!r.ok()) failures.add(fmt::format("Put (pair) {}: {}", id, r.error));
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  return result;
}

// Puts every hold from many connections at once, with more Get..Put pairs racing them.
void storm_release(Daemon& d, const std::map<std::string, std::string>& held, int connections,
                   std::mt19937& rng, Failures& failures) {
  std::vector<std::pair<std::string, bool>> ops;  // (id, true: Put of the hold; false: a pair)
  for (const auto& [id, dir] : held) {
    ops.emplace_back(id, true);
    if (std::bernoulli_distribution(0.3)(rng)) ops.emplace_back(id, false);
  }
  std::shuffle(ops.begin(), ops.end(), rng);
  std::atomic<std::size_t> next{0};
  std::barrier start(connections);
  std::vector<std::thread> threads;
  for (int t = 0; t < connections; ++t) {
    threads.emplace_back([&] {
      UnixHttpClient c(d.socket(), 120s);
      start.arrive_and_wait();
      for (std::size_t i = next++; i < ops.size(); i = next++) {
        const auto& [id, is_hold] = ops[i];
        if (!is_hold) {
          Answer g = call(c, "Get", layerd::tools::layer_args(id));
          if (!g.ok()) {
            failures.add(fmt::format("Get (release pair) {}: {}", id, g.error));
            continue;
          }
        }
        Answer p = call(c, "Put", layerd::tools::layer_args(id));
        if (!p.ok()) failures.add(fmt::format("Put {}: {}", id, p.error));
      }
    });
  }
  for (auto& t : threads) t.join();
}

// After every Put: no mount, no server, refcounts zero, layerd's fds back to the baseline.
void expect_clean(Daemon& d, const std::vector<Layer>& layers, std::size_t baseline_fds) {
  EXPECT_EQ(layerd::test::mounts_under(d.root()), std::vector<std::string>{});
  // Put awaits the server's exit; a short grace covers a reaped-but-listed /proc entry.
  auto deadline = std::chrono::steady_clock::now() + 2s;
  while (!fuse_server_pids(d.root()).empty() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(fuse_server_pids(d.root()).size(), 0u) << "fuse-overlayfs servers left under " << d.root();
  {
    UnixHttpClient c(d.socket(), 30s);
    json by_id = layers_by_id(c);
    std::size_t nonzero = 0;
    for (const auto& l : layers) {
      ASSERT_TRUE(by_id.contains(l.id)) << l.id << " missing from /v1/layers";
      if (by_id[l.id]["refcount"] != 0 || by_id[l.id]["mounted"] != false) {
        if (++nonzero <= 5) ADD_FAILURE() << "after release: " << by_id[l.id].dump();
      }
    }
    EXPECT_EQ(nonzero, 0u);
    // An extra Put is harmless.
    for (std::size_t i = 0; i < std::min<std::size_t>(10, layers.size()); ++i) {
      Answer a = call(c, "Put", layerd::tools::layer_args(layers[i].id));
      EXPECT_TRUE(a.ok()) << "extra Put " << layers[i].id << ": " << a.error;
    }
    by_id = layers_by_id(c);
    for (std::size_t i = 0; i < std::min<std::size_t>(10, layers.size()); ++i) {
      EXPECT_EQ(by_id[layers[i].id]["refcount"], 0) << by_id[layers[i].id].dump();
    }
  }
  std::size_t fds = d.settled_fds(baseline_fds);
  EXPECT_LE(fds, baseline_fds) << "layerd's fds after the storm (baseline " << baseline_fds << ")";
}

std::vector<const Layer*> with_parent(const std::vector<Layer>& layers) {
  std::vector<const Layer*> out;
  for (const auto& l : layers) {
    if (!l.parent.empty()) out.push_back(&l);
  }
  return out;
}

class Stress : public ::testing::Test {
 protected:
  void SetUp() override {
    if (auto why = layerd::test::fuse_unavailable_reason()) GTEST_SKIP() << *why;
    // 1,000 client connections plus their mounts' files need more than the default 1,024 fds.
    rlimit lim{};
    if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
      lim.rlim_cur = lim.rlim_max;
      (void)::setrlimit(RLIMIT_NOFILE, &lim);
    }
    unsigned seed = std::random_device{}();
    if (const char* s = std::getenv("LAYERD_STRESS_SEED")) seed = static_cast<unsigned>(std::atoll(s));
    RecordProperty("seed", std::to_string(seed));
    std::fprintf(stderr, "seed %u (LAYERD_STRESS_SEED to replay), scale %d\n", seed, scale());
    rng_.seed(seed);
    daemon_ = std::make_unique<Daemon>();
  }
  void TearDown() override {
    if (!daemon_) return;
    // layerd shuts down cleanly after the storm (exit 0 on SIGTERM, no assertion, no hang).
    int status = daemon_->stop();
    EXPECT_TRUE(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "layerd's wait status after SIGTERM: " << status;
    if (HasFailure()) std::fprintf(stderr, "layerd log (tail):\n%s\n", tail(daemon_->log()).c_str());
    daemon_.reset();
  }
  static std::string tail(const std::string& s) { return s.size() > 4000 ? s.substr(s.size() - 4000) : s; }

  std::mt19937 rng_;
  std::unique_ptr<Daemon> daemon_;
};

TEST_F(Stress, MountStormWithRandomGetPutLeavesNothingBehind) {
  Daemon& d = *daemon_;
  Failures failures;
  const int mountable_target = 300 * scale();
  std::vector<Layer> layers = make_chains(d, "ms", mountable_target, rng_, failures);
  ASSERT_EQ(failures.count(), 0u) << failures.summary();
  std::vector<const Layer*> mountable = with_parent(layers);
  std::size_t baseline = d.settled_fds(0, 300ms);

  // Every mountable layer Got at once (one connection per layer up to 512), with racing pairs.
  int connections = std::min<int>(static_cast<int>(mountable.size()), 512);
  StormResult r = storm_hold(d, mountable, connections, rng_, failures, false);
  ASSERT_EQ(failures.count(), 0u) << failures.summary();
  ASSERT_EQ(r.held.size(), mountable.size());

  // All held at the same time: one mount and one server per layer, every file readable.
  EXPECT_EQ(layerd::test::mounts_under(d.root()).size(), mountable.size());
  EXPECT_EQ(fuse_server_pids(d.root()).size(), mountable.size());
  {
    UnixHttpClient c(d.socket(), 30s);
    json by_id = layers_by_id(c);
    for (const Layer* l : mountable) {
      const json& j = by_id[l->id];
      EXPECT_TRUE(j["refcount"] == 1 && j["mounted"] == true) << "while held: " << j.dump();
    }
  }
  std::size_t bad = 0;
  for (const Layer* l : mountable) {
    std::string err = check_content(*l, r.held[l->id]);
    if (!err.empty() && ++bad <= 5) ADD_FAILURE() << err;
  }
  EXPECT_EQ(bad, 0u);

  storm_release(d, r.held, connections, rng_, failures);
  EXPECT_EQ(failures.count(), 0u) << failures.summary();
  expect_clean(d, layers, baseline);
}

TEST_F(Stress, MountStormWhileFuseServersAreKilled) {
  Daemon& d = *daemon_;
  Failures failures;
  const int mountable_target = 300 * scale();
  std::vector<Layer> layers = make_chains(d, "kill", mountable_target, rng_, failures);
  ASSERT_EQ(failures.count(), 0u) << failures.summary();
  std::vector<const Layer*> mountable = with_parent(layers);
  std::size_t baseline = d.settled_fds(0, 300ms);

  // The killer: kill -9 of a random server under the root every few milliseconds, during the
  // whole storm and for a while after it (so held, idle mounts die too).
  std::atomic<bool> stop{false};
  std::atomic<int> kills{0};
  std::mt19937 killer_rng(rng_());
  std::thread killer([&] {
    while (!stop) {
      std::vector<pid_t> pids = fuse_server_pids(d.root());
      if (!pids.empty()) {
        pid_t victim = pids[std::uniform_int_distribution<std::size_t>(0, pids.size() - 1)(killer_rng)];
        if (::kill(victim, SIGKILL) == 0) ++kills;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(2, 15)(killer_rng)));
    }
  });
  int connections = std::min<int>(static_cast<int>(mountable.size()), 512);
  // A Get whose server is killed while it starts may fail (the early exit is reported); it then
  // holds nothing, which the refcount check below verifies.
  StormResult r = storm_hold(d, mountable, connections, rng_, failures, true);
  std::this_thread::sleep_for(500ms);
  stop = true;
  killer.join();
  std::fprintf(stderr, "%d servers killed; %zu of %zu Gets failed\n", kills.load(), r.failed_gets, r.gets);
  EXPECT_EQ(failures.count(), 0u) << failures.summary();
  EXPECT_GT(kills.load(), 20);
  // Most Gets succeed: a failure is only a start raced by the killer.
  EXPECT_LT(r.failed_gets * 4, r.gets);

  // Every held layer becomes readable again (healed), within a deadline.
  std::vector<std::string> unreadable;
  auto deadline = std::chrono::steady_clock::now() + 30s;
  for (;;) {
    unreadable.clear();
    for (const Layer* l : mountable) {
      auto it = r.held.find(l->id);
      if (it == r.held.end()) continue;
      std::string err = check_content(*l, it->second);
      if (!err.empty()) unreadable.push_back(err);
    }
    if (unreadable.empty() || std::chrono::steady_clock::now() > deadline) break;
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_TRUE(unreadable.empty()) << unreadable.size() << " held layers unreadable, e.g. " << unreadable.front();
  {
    UnixHttpClient c(d.socket(), 30s);
    json by_id = layers_by_id(c);
    std::size_t wrong = 0;
    for (const Layer* l : mountable) {
      int expected = r.held.count(l->id) != 0 ? 1 : 0;
      const json& j = by_id[l->id];
      if (j["refcount"] != expected && ++wrong <= 5) ADD_FAILURE() << "expected refcount " << expected << ": " << j.dump();
    }
    EXPECT_EQ(wrong, 0u);
  }

  storm_release(d, r.held, connections, rng_, failures);
  EXPECT_EQ(failures.count(), 0u) << failures.summary();
  expect_clean(d, layers, baseline);
}

TEST_F(Stress, ThousandControlConnectionsWhileMountsChurn) {
  Daemon& d = *daemon_;
  Failures failures;
  std::vector<Layer> layers = make_chains(d, "ctl", 40, rng_, failures);
  ASSERT_EQ(failures.count(), 0u) << failures.summary();
  std::vector<const Layer*> mountable = with_parent(layers);
  std::size_t baseline = d.settled_fds(0, 300ms);

  // Churn: 16 connections Get and Put the mountable layers, and create, mount and remove
  // read-write layers, until the control clients are done.
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> churned{0};
  std::vector<std::thread> churners;
  for (int t = 0; t < 16; ++t) {
    churners.emplace_back([&, t] {
      UnixHttpClient c(d.socket(), 120s);
      std::mt19937 rng(static_cast<unsigned>(t) * 7919u + 1u);
      for (int i = 0; !stop; ++i) {
        if (i % 2 == 0) {
          const Layer* l = mountable[std::uniform_int_distribution<std::size_t>(0, mountable.size() - 1)(rng)];
          Answer g = call(c, "Get", layerd::tools::layer_args(l->id));
          if (!g.ok()) failures.add(fmt::format("churn Get {}: {}", l->id, g.error));
          else if (Answer p = call(c, "Put", layerd::tools::layer_args(l->id)); !p.ok())
            failures.add(fmt::format("churn Put {}: {}", l->id, p.error));
        } else {
          std::string id = fmt::format("ctl-rw-{}-{}", t, i);
          const Layer* parent = &layers[std::uniform_int_distribution<std::size_t>(0, layers.size() - 1)(rng)];
          for (const char* m : {"CreateReadWrite", "Get", "Put", "Remove"}) {
            Answer a = call(c, m, layerd::tools::layer_args(id, std::string_view(m) == "CreateReadWrite" ? parent->id : ""));
            if (!a.ok()) {
              failures.add(fmt::format("churn {} {}: {}", m, id, a.error));
              break;
            }
          }
        }
        ++churned;
      }
    });
  }

  const int clients = 1000;
  const int per_client = 30 * scale();
  std::atomic<std::uint64_t> answered{0};
  std::atomic<std::uint64_t> connected{0};
  std::atomic<std::uint64_t> peak_connections{0};
  std::barrier all_connected(clients + 1);
  std::barrier done(clients + 1);
  std::vector<std::thread> threads;
  threads.reserve(clients);
  for (int t = 0; t < clients; ++t) {
    threads.emplace_back([&, t] {
      UnixHttpClient c(d.socket(), 120s);
      try {
        c.connect();
        ++connected;
      } catch (const std::exception& e) {
        failures.add(fmt::format("connect {}: {}", t, e.what()));
      }
      all_connected.arrive_and_wait();
      std::mt19937 rng(static_cast<unsigned>(t) + 17u);
      for (int i = 0; i < per_client; ++i) {
        const Layer& l = layers[std::uniform_int_distribution<std::size_t>(0, layers.size() - 1)(rng)];
        switch (std::uniform_int_distribution<int>(0, 3)(rng)) {
          case 0: {
            Answer a = call(c, "Exists", layerd::tools::layer_args(l.id));
            if (!a.ok() || a.body.value("Exists", false) != true)
              failures.add(fmt::format("Exists {}: {} {}", l.id, a.error, a.body.dump()));
            break;
          }
          case 1: {
            std::string missing = fmt::format("ctl-missing-{}-{}", t, i);
            Answer a = call(c, "Exists", layerd::tools::layer_args(missing));
            if (!a.ok() || !a.body.contains("Exists") || a.body["Exists"] != false)
              failures.add(fmt::format("Exists {}: {} {}", missing, a.error, a.body.dump()));
            break;
          }
          case 2: {
            Answer a = call(c, "GetMetadata", layerd::tools::layer_args(l.id));
            const std::string home = d.root() + "/";
            std::string lowers;
            for (const auto& anc : l.ancestors) lowers += (lowers.empty() ? "" : ":") + home + anc + "/diff";
            json m = a.body.is_object() ? a.body.value("Metadata", json::object()) : json::object();
            bool right = a.ok() && m.value("UpperDir", "") == home + l.id + "/diff" &&
                         m.value("WorkDir", "") == home + l.id + "/work" &&
                         m.value("MergedDir", "") == home + l.id + "/merged" &&
                         m.value("LowerDir", "") == lowers;
            if (!right) failures.add(fmt::format("GetMetadata {}: {} {}", l.id, a.error, a.body.dump()));
            break;
          }
          default: {
            Answer a = call(c, "Status", json::object());
            bool right = a.ok() && a.body.contains("Status") && a.body["Status"].is_array();
            std::string home;
            if (right) {
              for (const auto& pair : a.body["Status"]) {
                if (pair.is_array() && pair.size() == 2 && pair[0] == "Home") home = pair[1].get<std::string>();
              }
            }
            if (!right || home != d.root()) failures.add(fmt::format("Status: {} {}", a.error, a.body.dump()));
            break;
          }
        }
        ++answered;
      }
      done.arrive_and_wait();
    });
  }
  all_connected.arrive_and_wait();
  // Every client connection is open at once (the server counts them).
  {
    UnixHttpClient c(d.socket(), 30s);
    peak_connections = get_json(c, "/v1/health").value("connections", 0);
  }
  done.arrive_and_wait();
  stop = true;
  for (auto& t : threads) t.join();
  for (auto& t : churners) t.join();
  std::fprintf(stderr, "%llu control answers, %llu churn cycles, %llu connections open at once\n",
               static_cast<unsigned long long>(answered.load()), static_cast<unsigned long long>(churned.load()),
               static_cast<unsigned long long>(peak_connections.load()));

  EXPECT_EQ(connected.load(), static_cast<std::uint64_t>(clients));
  EXPECT_GE(peak_connections.load(), static_cast<std::uint64_t>(clients));
  EXPECT_EQ(answered.load(), static_cast<std::uint64_t>(clients) * per_client);
  EXPECT_GT(churned.load(), 0u);
  EXPECT_EQ(failures.count(), 0u) << failures.summary();
  expect_clean(d, layers, baseline);
}

}  // namespace
