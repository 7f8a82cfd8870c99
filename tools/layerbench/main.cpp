// layerbench: drives a running layerd over its socket with many concurrent keep-alive
// connections (libuv, independent of layerd's loop) and reports throughput, latency percentiles,
// errors by kind, health-check latency during the run and layerd's RSS and fd count.
//
// Scenarios: storm (mount storm), churn (Create/Get/Put/Remove at a rate), control
// (Exists/GetMetadata/Status at high concurrency), apply (ApplyDiff of generated layers),
// health (GET /v1/health only: the server without the driver).
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <set>
#include <sstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "runner.hpp"
#include "tar_stream.hpp"

using nlohmann::json;
using namespace layerbench;

namespace {

constexpr const char* kMarkerFile = "layerbench.txt";

struct Options {
  Runner::Options runner;
  bool json = false;
  bool keep = false;
  std::string prefix;
  // storm / apply
  int layers = 100;
  int depth = 2;
  int image = 0;  // storm: N read-write layers on one image chain of this many layers
  std::vector<std::string> control_ops{"Exists", "GetMetadata", "Status"};
  // churn / control
  double duration = 10;
  double rate = 200;
  std::uint64_t requests = 0;
  // apply
  std::string kind = "small";
  std::size_t files = 1000;
  std::uint64_t file_size = 1024;
  std::uint64_t size = 256ull << 20;
};

Call plugin(std::string op, const json& args, std::function<void(const Outcome&)> done = {}) {
  Call c;
  c.op = op;
  c.request = layerd::tools::plugin_request(op, args);
  c.done = std::move(done);
  return c;
}

json id_args(const std::string& id, const std::string& parent = {}) {
  return layerd::tools::layer_args(id, parent);
}

// A sequence over a fixed list of calls.
Sequence sequence_of(std::vector<Call> calls) {
  auto list = std::make_shared<std::vector<Call>>(std::move(calls));
  auto index = std::make_shared<std::size_t>(0);
  return [list, index]() -> std::optional<Call> {
    if (*index >= list->size()) return std::nullopt;
    return std::move((*list)[(*index)++]);
  };
}

// A phase over a fixed list of sequences.
PhaseSpec phase_of(std::string name, std::vector<Sequence> sequences) {
  auto list = std::make_shared<std::vector<Sequence>>(std::move(sequences));
  auto index = std::make_shared<std::size_t>(0);
  PhaseSpec spec;
  spec.name = std::move(name);
  spec.next = [list, index]() -> std::optional<Sequence> {
    if (*index >= list->size()) return std::nullopt;
    return std::move((*list)[(*index)++]);
  };
  return spec;
}

std::string dir_of(const Outcome& o) {
  json j = json::parse(o.body, nullptr, false);
  return j.is_object() && j.contains("Dir") && j["Dir"].is_string() ? j["Dir"].get<std::string>()
                                                                    : std::string();
}

bool write_marker(const std::string& dir, const std::string& content) {
  std::ofstream f(dir + "/" + kMarkerFile, std::ios::trunc);
  f << content;
  return static_cast<bool>(f);
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Report {
  std::string scenario;
  json params;
  std::vector<PhaseResult> phases;
  std::vector<std::string> notes;
};

// ---------------------------------------------------------------------------------------------
// Scenarios

// Mount storm: chains of depth D totalling N layers; Get all at once, read a file through each
// mount, Put all, Remove all.
void storm_on_image(Runner& runner, const Options& o, Report& report);

void storm(Runner& runner, const Options& o, Report& report) {
  if (o.image > 0) {
    storm_on_image(runner, o, report);
    return;
  }
  int chains = (o.layers + o.depth - 1) / o.depth;
  auto id = [&](int c, int d) { return fmt::format("{}-c{}-d{}", o.prefix, c, d); };
  auto depth_of = [&](int c) { return std::min(o.depth, o.layers - c * o.depth); };
  report.params = {{"layers", o.layers}, {"depth", o.depth}, {"chains", chains},
                   {"connections", o.runner.connections}};

  // Each chain's base layer gets a marker file (through its diff dir: a layer without parent
  // has no mount), so every mount above it can be checked for content.
  std::set<std::string> created;
  std::vector<Sequence> create_seqs;
  for (int c = 0; c < chains; ++c) {
    std::vector<Call> calls;
    std::string base = id(c, 0);
    calls.push_back(plugin("Create", id_args(base), [&created, base](const Outcome& r) {
      if (r.ok) created.insert(base);
    }));
    calls.push_back(plugin("Get", id_args(base), [base](const Outcome& r) {
      if (r.ok) (void)write_marker(dir_of(r), base);
    }));
    calls.push_back(plugin("Put", id_args(base)));
    for (int d = 1; d < depth_of(c); ++d) {
      std::string layer = id(c, d);
      calls.push_back(plugin("Create", id_args(layer, id(c, d - 1)), [&created, layer](const Outcome& r) {
        if (r.ok) created.insert(layer);
      }));
    }
    create_seqs.push_back(sequence_of(std::move(calls)));
  }
  report.phases.push_back(runner.run_phase(phase_of("create", std::move(create_seqs))));

  std::map<std::string, std::string> dirs;
  std::vector<Sequence> get_seqs;
  for (int c = 0; c < chains; ++c) {
    for (int d = 0; d < depth_of(c); ++d) {
      std::string layer = id(c, d);
      get_seqs.push_back(sequence_of({plugin("Get", id_args(layer), [&dirs, layer](const Outcome& r) {
        if (r.ok) dirs[layer] = dir_of(r);
      })}));
    }
  }
  report.phases.push_back(runner.run_phase(phase_of("get", std::move(get_seqs))));

  std::vector<std::function<std::string()>> reads;
  for (const auto& [layer, dir] : dirs) {
    std::string expected = layer.substr(0, layer.rfind("-d")) + "-d0";
    std::string path = dir + "/" + kMarkerFile;
    reads.push_back([path, expected]() -> std::string {
      std::ifstream f(path);
      if (!f) return fmt::format("open: {}", std::strerror(errno));
      std::stringstream ss;
      ss << f.rdbuf();
      return ss.str() == expected ? std::string() : std::string("wrong content");
    });
  }
  report.phases.push_back(runner.run_work("read", "read", std::move(reads)));

  std::vector<Sequence> put_seqs;
  for (const auto& [layer, dir] : dirs) put_seqs.push_back(sequence_of({plugin("Put", id_args(layer))}));
  report.phases.push_back(runner.run_phase(phase_of("put", std::move(put_seqs))));

  if (o.keep) return;
  std::vector<Sequence> rm_seqs;
  for (int c = 0; c < chains; ++c) {
    std::vector<Call> calls;
    for (int d = depth_of(c) - 1; d >= 0; --d) {
      if (created.count(id(c, d)) != 0) calls.push_back(plugin("Remove", id_args(id(c, d))));
    }
    rm_seqs.push_back(sequence_of(std::move(calls)));
  }
  report.phases.push_back(runner.run_phase(phase_of("remove", std::move(rm_seqs))));
}

// Mount storm as containers start: N read-write layers on one image of `image` layers, so every
// mount has `image` lowers; Get all at once, read the image's file through each, Put all.
void storm_on_image(Runner& runner, const Options& o, Report& report) {
  auto img = [&](int d) { return fmt::format("{}-img{}", o.prefix, d); };
  auto rw = [&](int i) { return fmt::format("{}-rw{}", o.prefix, i); };
  report.params = {{"layers", o.layers}, {"image_depth", o.image}, {"connections", o.runner.connections}};
  std::vector<Call> chain;
  chain.push_back(plugin("Create", id_args(img(0))));
  std::string base = img(0);
  chain.push_back(plugin("Get", id_args(base), [base](const Outcome& r) {
    if (r.ok) (void)write_marker(dir_of(r), base);
  }));
  chain.push_back(plugin("Put", id_args(base)));
  for (int d = 1; d < o.image; ++d) chain.push_back(plugin("Create", id_args(img(d), img(d - 1))));
  report.phases.push_back(runner.run_phase(phase_of("image", {sequence_of(std::move(chain))})));
  std::vector<Sequence> creates;
  for (int i = 0; i < o.layers; ++i)
    creates.push_back(sequence_of({plugin("CreateReadWrite", id_args(rw(i), img(o.image - 1)))}));
  report.phases.push_back(runner.run_phase(phase_of("create", std::move(creates))));

  std::map<std::string, std::string> dirs;
  std::vector<Sequence> gets;
  for (int i = 0; i < o.layers; ++i) {
    std::string layer = rw(i);
    gets.push_back(sequence_of({plugin("Get", id_args(layer), [&dirs, layer](const Outcome& r) {
      if (r.ok) dirs[layer] = dir_of(r);
    })}));
  }
  report.phases.push_back(runner.run_phase(phase_of("get", std::move(gets))));
  std::vector<std::function<std::string()>> reads;
  for (const auto& [layer, dir] : dirs) {
    std::string path = dir + "/" + kMarkerFile;
    reads.push_back([path, base]() -> std::string {
      std::ifstream f(path);
      if (!f) return fmt::format("open: {}", std::strerror(errno));
      std::stringstream ss;
      ss << f.rdbuf();
      return ss.str() == base ? std::string() : std::string("wrong content");
    });
  }
  report.phases.push_back(runner.run_work("read", "read", std::move(reads)));
  std::vector<Sequence> puts;
  for (const auto& [layer, dir] : dirs) puts.push_back(sequence_of({plugin("Put", id_args(layer))}));
  report.phases.push_back(runner.run_phase(phase_of("put", std::move(puts))));
  if (o.keep) return;
  std::vector<Sequence> removes;
  for (int i = 0; i < o.layers; ++i) removes.push_back(sequence_of({plugin("Remove", id_args(rw(i)))}));
  report.phases.push_back(runner.run_phase(phase_of("remove", std::move(removes))));
  std::vector<Call> unchain;
  for (int d = o.image - 1; d >= 0; --d) unchain.push_back(plugin("Remove", id_args(img(d))));
  report.phases.push_back(runner.run_phase(phase_of("remove-image", {sequence_of(std::move(unchain))})));
}

// A base layer with the marker file, for churn and control.
bool make_base(Runner& runner, const std::string& base, Report& report) {
  PhaseResult r = runner.run_phase(phase_of(
      "setup", {sequence_of({plugin("Create", id_args(base)),
                             plugin("Get", id_args(base), [base](const Outcome& g) {
                               if (g.ok) (void)write_marker(dir_of(g), base);
                             }),
                             plugin("Put", id_args(base))})}));
  bool ok = r.total_errors() == 0;
  report.phases.push_back(std::move(r));
  return ok;
}

void remove_base(Runner& runner, const Options& o, const std::string& base, Report& report) {
  if (o.keep) return;
  report.phases.push_back(runner.run_phase(phase_of("teardown", {sequence_of({plugin("Remove", id_args(base))})})));
}

// Churn: container lifecycles (CreateReadWrite on the base, Get, Put, Remove) started at
// rate/4 per second, for the duration.
void churn(Runner& runner, const Options& o, Report& report) {
  report.params = {{"rate_ops_per_second", o.rate}, {"duration_seconds", o.duration},
                   {"connections", o.runner.connections}};
  std::string base = o.prefix + "-base";
  if (!make_base(runner, base, report)) {
    report.notes.push_back("setup failed: churn skipped");
    return;
  }
  auto counter = std::make_shared<std::uint64_t>(0);
  double deadline = now_seconds() + o.duration;
  PhaseSpec spec;
  spec.name = "churn";
  spec.sequences_per_second = o.rate / 4.0;
  spec.next = [=, &o]() -> std::optional<Sequence> {
    if (now_seconds() >= deadline) return std::nullopt;
    std::string layer = fmt::format("{}-k{}", o.prefix, (*counter)++);
    return sequence_of({plugin("CreateReadWrite", id_args(layer, base)), plugin("Get", id_args(layer)),
                        plugin("Put", id_args(layer)), plugin("Remove", id_args(layer))});
  };
  report.phases.push_back(runner.run_phase(spec));
  remove_base(runner, o, base, report);
}

// Control plane: every connection loops over Exists, GetMetadata and Status.
void control(Runner& runner, const Options& o, Report& report) {
  report.params = {{"duration_seconds", o.duration}, {"requests", o.requests},
                   {"connections", o.runner.connections}};
  std::string target = o.prefix + "-target";
  if (!make_base(runner, target, report)) {
    report.notes.push_back("setup failed: control skipped");
    return;
  }
  double deadline = now_seconds() + o.duration;
  auto issued = std::make_shared<std::uint64_t>(0);
  auto started = std::make_shared<int>(0);
  int connections = o.runner.connections;
  std::uint64_t budget = o.requests;
  std::vector<std::string> ops = o.control_ops;
  PhaseSpec spec;
  spec.name = "control";
  spec.next = [=]() -> std::optional<Sequence> {
    if (*started >= connections) return std::nullopt;
    ++*started;
    return Sequence([=]() -> std::optional<Call> {
      if (budget > 0 ? *issued >= budget : now_seconds() >= deadline) return std::nullopt;
      const std::string& op = ops[(*issued)++ % ops.size()];
      return plugin(op, op == "Status" ? json::object() : id_args(target));
    });
  };
  report.phases.push_back(runner.run_phase(spec));
  remove_base(runner, o, target, report);
}

// Health: every connection loops over GET /v1/health (the loop and the HTTP layer, no driver).
void health(Runner& runner, const Options& o, Report& report) {
  report.params = {{"duration_seconds", o.duration}, {"requests", o.requests},
                   {"connections", o.runner.connections}};
  double deadline = now_seconds() + o.duration;
  auto issued = std::make_shared<std::uint64_t>(0);
  auto started = std::make_shared<int>(0);
  int connections = o.runner.connections;
  std::uint64_t budget = o.requests;
  PhaseSpec spec;
  spec.name = "health";
  spec.next = [=]() -> std::optional<Sequence> {
    if (*started >= connections) return std::nullopt;
    ++*started;
    return Sequence([=]() -> std::optional<Call> {
      if (budget > 0 ? *issued >= budget : now_seconds() >= deadline) return std::nullopt;
      ++*issued;
      Call c;
      c.op = "GET /v1/health";
      c.request.method = "GET";
      c.request.target = "/v1/health";
      return c;
    });
  };
  report.phases.push_back(runner.run_phase(spec));
}

class TarBody : public BodySource {
 public:
  explicit TarBody(TarStream stream) : stream_(std::move(stream)) {}
  std::size_t read(char* buffer, std::size_t capacity) override { return stream_.read(buffer, capacity); }

 private:
  TarStream stream_;
};

// Apply: N layers created, then ApplyDiff of a generated tar to each from many clients at once.
void apply(Runner& runner, const Options& o, Report& report) {
  auto make = [&]() {
    return o.kind == "big" ? TarStream::big_file(o.size) : TarStream::small_files(o.files, o.file_size);
  };
  std::uint64_t tar_bytes = make().total_size();
  report.params = {{"layers", o.layers}, {"kind", o.kind}, {"tar_bytes_per_layer", tar_bytes},
                   {"connections", o.runner.connections}};
  if (o.kind == "big") {
    report.params["file_size"] = o.size;
  } else {
    report.params["files"] = o.files;
    report.params["file_size"] = o.file_size;
  }
  auto id = [&](int i) { return fmt::format("{}-a{}", o.prefix, i); };
  std::vector<Sequence> creates;
  for (int i = 0; i < o.layers; ++i) creates.push_back(sequence_of({plugin("Create", id_args(id(i)))}));
  report.phases.push_back(runner.run_phase(phase_of("create", std::move(creates))));

  std::vector<Sequence> applies;
  for (int i = 0; i < o.layers; ++i) {
    Call c;
    c.op = "ApplyDiff";
    c.request.method = "POST";
    c.request.target = layerd::tools::apply_diff_target(id(i), "");
    c.body = std::make_shared<TarBody>(make());
    std::vector<Call> calls;
    calls.push_back(std::move(c));
    applies.push_back(sequence_of(std::move(calls)));
  }
  PhaseResult applied = runner.run_phase(phase_of("apply", std::move(applies)));
  double mib = static_cast<double>(tar_bytes) * static_cast<double>(applied.ops["ApplyDiff"].ok) / (1 << 20);
  report.notes.push_back(fmt::format("apply: {:.1f} MiB applied, {:.1f} MiB/s", mib,
                                     applied.seconds > 0 ? mib / applied.seconds : 0.0));
  report.phases.push_back(std::move(applied));
  if (o.keep) return;
  std::vector<Sequence> removes;
  for (int i = 0; i < o.layers; ++i) removes.push_back(sequence_of({plugin("Remove", id_args(id(i)))}));
  report.phases.push_back(runner.run_phase(phase_of("remove", std::move(removes))));
}

// ---------------------------------------------------------------------------------------------
// Output

json daemon_json(const Runner& runner) {
  json d;
  d["pid"] = runner.daemon_pid();
  const auto& s = runner.samples();
  d["samples"] = s.size();
  if (!s.empty()) {
    std::uint64_t rss_max = 0;
    std::uint64_t fds_max = 0;
    for (const auto& x : s) {
      rss_max = std::max(rss_max, x.rss_bytes);
      fds_max = std::max(fds_max, x.fds);
    }
    d["rss_start_bytes"] = s.front().rss_bytes;
    d["rss_max_bytes"] = rss_max;
    d["rss_end_bytes"] = s.back().rss_bytes;
    d["fds_start"] = s.front().fds;
    d["fds_max"] = fds_max;
    d["fds_end"] = s.back().fds;
  }
  return d;
}

json health_json(const Runner& runner) {
  json h = runner.health().latency.summary();
  h["ok"] = runner.health().ok;
  h["errors"] = runner.health().errors;
  h["prober_nice"] = runner.monitor_nice();
  return h;
}

void print_human(const Report& report, const Runner& runner) {
  fmt::print("layerbench {}  {}\n", report.scenario, report.params.dump());
  for (const auto& p : report.phases) {
    fmt::print("\nphase {:<9} {:8.3f} s  {} ok  {} errors  {:.1f}/s\n", p.name, p.seconds, p.total_ok(),
               p.total_errors(), p.seconds > 0 ? static_cast<double>(p.total_ok()) / p.seconds : 0.0);
    for (const auto& [op, s] : p.ops) {
      fmt::print("  {:<12} n={:<7} p50 {:8.3f}  p90 {:8.3f}  p99 {:8.3f}  max {:8.3f} ms\n", op,
                 s.latency.count(), s.latency.percentile(50), s.latency.percentile(90),
                 s.latency.percentile(99), s.latency.percentile(100));
      for (const auto& [kind, n] : s.errors) fmt::print("    error x{}: {}\n", n, kind);
    }
  }
  const auto& h = runner.health();
  fmt::print("\nhealth probes: {} ok, p50 {:.3f} p99 {:.3f} max {:.3f} ms (prober at niceness {})", h.ok,
             h.latency.percentile(50), h.latency.percentile(99), h.latency.percentile(100),
             runner.monitor_nice());
  for (const auto& [kind, n] : h.errors) fmt::print(", {} x {}", n, kind);
  fmt::print("\n");
  json d = daemon_json(runner);
  if (d.contains("rss_max_bytes")) {
    fmt::print("layerd pid {}: RSS start {:.1f} max {:.1f} end {:.1f} MiB; fds start {} max {} end {}\n",
               runner.daemon_pid(), d["rss_start_bytes"].get<double>() / (1 << 20),
               d["rss_max_bytes"].get<double>() / (1 << 20), d["rss_end_bytes"].get<double>() / (1 << 20),
               d["fds_start"].get<std::uint64_t>(), d["fds_max"].get<std::uint64_t>(),
               d["fds_end"].get<std::uint64_t>());
  } else {
    fmt::print("layerd resources: not sampled (pid {} unreadable)\n", runner.daemon_pid());
  }
  for (const auto& n : report.notes) fmt::print("{}\n", n);
}

void raise_fd_limit() {
  // Thousands of connections need thousands of descriptors.
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &lim);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"layerbench: load generator for layerd over its unix socket (libuv)."};
  app.name("layerbench");
  app.require_subcommand(1);
  app.fallthrough();
  app.footer("Exit codes: 0 no errors, 1 some operations failed, 2 usage, 3 cannot connect.");

  Options o;
  o.runner.socket = "/run/layerd/layerd.sock";
  if (const char* env = std::getenv("LAYERD_SOCKET"); env != nullptr && *env != '\0') o.runner.socket = env;
  app.add_option("-s,--socket", o.runner.socket, "layerd's socket (env LAYERD_SOCKET)")->capture_default_str();
  app.add_option("-c,--connections", o.runner.connections, "concurrent connections (the concurrency)")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  app.add_flag("--json", o.json, "print the report as JSON");
  app.add_option("--timeout", o.runner.timeout_seconds, "seconds before a call counts as timed out (0: never)")
      ->capture_default_str();
  app.add_option("--health-interval", o.runner.health_interval_ms,
                 "milliseconds between /v1/health probes on a separate connection (0: no prober)")
      ->capture_default_str();
  app.add_option("--sample-interval", o.runner.sample_interval_ms,
                 "milliseconds between samples of layerd's RSS and fds (0: none)")
      ->capture_default_str();
  app.add_option("--monitor-nice", o.runner.monitor_nice,
                 "niceness of the prober's and sampler's thread: ahead of the load so probes time "
                 "layerd, not their own wait for a CPU (needs CAP_SYS_NICE; 0: as the process)")
      ->capture_default_str()
      ->check(CLI::Range(-20, 19));
  app.add_option("--pid", o.runner.pid, "layerd's pid (default: the socket peer's)");
  app.add_option("--prefix", o.prefix, "layer id prefix (default: lb-<random>)");
  app.add_flag("--keep", o.keep, "keep the layers (skip the remove phase)");

  auto* storm_cmd = app.add_subcommand("storm", "mount storm: create N layers in chains of depth D, Get all at once, read a file through each, Put all, Remove all");
  storm_cmd->add_option("-n,--layers", o.layers, "layers")->capture_default_str()->check(CLI::PositiveNumber);
  storm_cmd->add_option("-d,--depth", o.depth, "chain depth")->capture_default_str()->check(CLI::Range(1, 128));
  storm_cmd->add_option("--on-image", o.image,
                        "instead of chains: N read-write layers on one image of this many layers (each mount has that many lowers)")
      ->check(CLI::Range(1, 128));

  auto* churn_cmd = app.add_subcommand("churn", "Create/Get/Put/Remove container lifecycles at a target rate for a duration");
  churn_cmd->add_option("-r,--rate", o.rate, "operations per second (4 per lifecycle)")->capture_default_str()->check(CLI::PositiveNumber);
  churn_cmd->add_option("-t,--duration", o.duration, "seconds")->capture_default_str()->check(CLI::PositiveNumber);

  auto* control_cmd = app.add_subcommand("control", "Exists/GetMetadata/Status on every connection for a duration or a request count");
  control_cmd->add_option("-t,--duration", o.duration, "seconds")->capture_default_str()->check(CLI::PositiveNumber);
  control_cmd->add_option("-n,--requests", o.requests, "total requests instead of a duration");
  control_cmd->add_option("--op", o.control_ops, "calls to cycle through (repeatable)")
      ->capture_default_str()
      ->check(CLI::IsMember({"Exists", "GetMetadata", "Status"}));

  auto* health_cmd = app.add_subcommand("health", "GET /v1/health on every connection for a duration or a request count (no driver calls)");
  health_cmd->add_option("-t,--duration", o.duration, "seconds")->capture_default_str()->check(CLI::PositiveNumber);
  health_cmd->add_option("-n,--requests", o.requests, "total requests instead of a duration");

  auto* apply_cmd = app.add_subcommand("apply", "ApplyDiff of generated layers from many clients at once");
  apply_cmd->add_option("-n,--layers", o.layers, "layers to apply")->capture_default_str()->check(CLI::PositiveNumber);
  apply_cmd->add_option("-k,--kind", o.kind, "small (many small files) or big (one big file)")
      ->capture_default_str()
      ->check(CLI::IsMember({"small", "big"}));
  apply_cmd->add_option("--files", o.files, "files per small-file layer")->capture_default_str();
  apply_cmd->add_option("--file-size", o.file_size, "bytes per small file")->capture_default_str();
  apply_cmd->add_option("--size", o.size, "bytes of the big file")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  if (o.prefix.empty()) {
    o.prefix = fmt::format("lb-{:x}", static_cast<unsigned>(::getpid() ^ (std::time(nullptr) << 8)) & 0xffffff);
  }
  raise_fd_limit();
  // libuv writes with write(2): a server that closes mid-upload must be an error, not SIGPIPE.
  (void)std::signal(SIGPIPE, SIG_IGN);
  // Reads through mounts run on libuv's pool: enough threads to keep many in flight.
  (void)::setenv("UV_THREADPOOL_SIZE", "32", 0);

  Report report;
  report.scenario = app.get_subcommands().front()->get_name();
  Runner runner(o.runner);
  try {
    runner.start();
  } catch (const std::exception& e) {
    std::cerr << "layerbench: " << e.what() << "\n";
    return 3;
  }
  if (report.scenario == "storm") storm(runner, o, report);
  if (report.scenario == "churn") churn(runner, o, report);
  if (report.scenario == "control") control(runner, o, report);
  if (report.scenario == "apply") apply(runner, o, report);
  if (report.scenario == "health") health(runner, o, report);
  // Let the prober and sampler see the end state once more.
  runner.stop();

  std::uint64_t errors = 0;
  for (const auto& p : report.phases) errors += p.total_errors();
  if (o.json) {
    json out;
    out["scenario"] = report.scenario;
    out["params"] = report.params;
    out["phases"] = json::array();
    for (const auto& p : report.phases) out["phases"].push_back(p.to_json());
    out["health"] = health_json(runner);
    out["daemon"] = daemon_json(runner);
    out["errors"] = errors;
    out["notes"] = report.notes;
    std::cout << out.dump(2) << "\n";
  } else {
    print_human(report, runner);
  }
  return errors == 0 ? 0 : 1;
}
