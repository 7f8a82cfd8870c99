// layerbench's engine on libuv: a pool of keep-alive HTTP/1.1 connections to layerd's unix
// socket (uv_pipe_connect), phases of call sequences spread over them, a health prober on its own
// connection, and a sampler of layerd's RSS and fd count (both on a thread and loop of their own,
// so the load's own work does not delay them). Independent of layerd's own loop.
#pragma once

#include <uv.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "http_client.hpp"

namespace layerbench {

// Latencies of one kind of operation, in milliseconds.
class Latencies {
 public:
  void add(double ms) { samples_.push_back(ms); }
  [[nodiscard]] std::size_t count() const noexcept { return samples_.size(); }
  // {"count","p50","p90","p99","max","mean"}; percentiles by nearest rank.
  [[nodiscard]] nlohmann::json summary() const;
  [[nodiscard]] double percentile(double p) const;

 private:
  mutable std::vector<double> samples_;
  mutable bool sorted_ = false;
};

struct OpStats {
  Latencies latency;  // successful calls
  std::uint64_t ok = 0;
  std::map<std::string, std::uint64_t> errors;  // by kind
};

// The result of one call.
struct Outcome {
  bool ok = false;
  int status = 0;
  std::string body;
  std::string error;  // kind of failure when !ok: "timeout", "closed", "http 500", "Err: ..."
  double ms = 0;
};

// A request body produced piece by piece (sent chunked); read() returns 0 at the end.
class BodySource {
 public:
  virtual ~BodySource() = default;
  virtual std::size_t read(char* buffer, std::size_t capacity) = 0;
};

struct Call {
  std::string op;  // the stats label ("Create", "Get", ...)
  layerd::tools::HttpRequest request;
  std::shared_ptr<BodySource> body;
  std::function<void(const Outcome&)> done;  // optional
};

// Calls that must run in order (e.g. Create then Get of one layer); nullopt ends it.
using Sequence = std::function<std::optional<Call>()>;

struct PhaseSpec {
  std::string name;
  // The next sequence to run, or nullopt when the phase has no more work.
  std::function<std::optional<Sequence>()> next;
  double sequences_per_second = 0;  // 0: as fast as connections allow
};

struct PhaseResult {
  std::string name;
  double seconds = 0;
  std::map<std::string, OpStats> ops;
  [[nodiscard]] std::uint64_t total_ok() const;
  [[nodiscard]] std::uint64_t total_errors() const;
  [[nodiscard]] nlohmann::json to_json() const;
};

struct ResourceSample {
  double t = 0;
  std::uint64_t rss_bytes = 0;
  std::uint64_t fds = 0;
};

class Runner {
 public:
  struct Options {
    std::string socket;
    int connections = 64;
    double timeout_seconds = 120;
    double health_interval_ms = 10;  // 0: no prober
    double sample_interval_ms = 100; // 0: no sampling
    // Niceness of the prober's and sampler's thread. Below the load's, so that a probe's
    // latency is layerd's and not this thread's own wait for a CPU on a loaded machine;
    // needs CAP_SYS_NICE (else the thread keeps the process's niceness).
    int monitor_nice = -10;
    pid_t pid = 0;                   // 0: the socket peer's pid
  };

  explicit Runner(Options options);
  ~Runner();
  Runner(const Runner&) = delete;
  Runner& operator=(const Runner&) = delete;

  // Opens the connections, starts the prober and the sampler. Throws on failure to connect.
  void start();
  // Runs a phase until its sequences are exhausted and every call completed.
  PhaseResult run_phase(const PhaseSpec& spec);
  // Runs `jobs` on libuv's thread pool (blocking work such as reading through mounts); each job
  // returns an empty string on success or the error kind.
  PhaseResult run_work(const std::string& name, const std::string& op,
                       std::vector<std::function<std::string()>> jobs);
  // Stops the prober and sampler and closes every connection.
  void stop();

  [[nodiscard]] pid_t daemon_pid() const noexcept { return pid_; }
  [[nodiscard]] const OpStats& health() const noexcept { return health_; }
  // The niceness the monitor thread ran at (after stop()).
  [[nodiscard]] int monitor_nice() const noexcept { return monitor_nice_; }
  [[nodiscard]] const std::vector<ResourceSample>& samples() const noexcept { return samples_; }
  [[nodiscard]] uv_loop_t* loop() noexcept { return &loop_; }

  struct Conn;

 private:
  friend struct Conn;
  void dispatch();
  void on_call_done(Conn& conn, Call& call, Outcome outcome);
  void maybe_finish_phase();
  void sample();
  void probe();
  static void on_tick(uv_timer_t* timer);
  static void on_sample_timer(uv_timer_t* timer);
  static void on_probe_timer(uv_timer_t* timer);
  static void on_monitor_stop(uv_async_t* async);
  void start_monitor();

  Options options_;
  uv_loop_t loop_{};
  std::vector<std::unique_ptr<Conn>> conns_;
  uv_timer_t tick_timer_{};
  // The monitor: prober and sampler on their own thread and loop (see start_monitor). What they
  // record (health_, samples_) is read only after stop() joined the thread.
  uv_loop_t monitor_loop_{};
  uv_async_t monitor_stop_{};
  std::thread monitor_;
  std::unique_ptr<Conn> prober_;
  int monitor_nice_ = 0;
  uv_timer_t sample_timer_{};
  uv_timer_t probe_timer_{};
  pid_t pid_ = 0;
  std::uint64_t started_ns_ = 0;
  std::vector<ResourceSample> samples_;
  OpStats health_;

  // The running phase.
  const PhaseSpec* phase_ = nullptr;
  PhaseResult* result_ = nullptr;
  bool phase_exhausted_ = false;
  double tokens_ = 0;
  std::uint64_t last_token_ns_ = 0;
  int work_pending_ = 0;
  std::atomic<bool> stopping_ = false;  // read by the monitor's thread too
  bool closed_ = false;
  bool in_dispatch_ = false;  // dispatch() re-entered from a completion it caused
  bool redispatch_ = false;
};

}  // namespace layerbench
