#include "runner.hpp"

#include <sys/resource.h>

#include <dirent.h>
#include <sys/socket.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include <fmt/format.h>

namespace layerbench {

using layerd::tools::HttpError;
using layerd::tools::ResponseParser;
using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Statistics

double Latencies::percentile(double p) const {
  if (samples_.empty()) return 0;
  if (!sorted_) {
    std::sort(samples_.begin(), samples_.end());
    sorted_ = true;
  }
  auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(samples_.size())));
  return samples_[std::clamp<std::size_t>(rank, 1, samples_.size()) - 1];
}

json Latencies::summary() const {
  double sum = 0;
  for (double v : samples_) sum += v;
  auto round3 = [](double v) { return std::round(v * 1000) / 1000; };
  return {{"count", samples_.size()},
          {"p50_ms", round3(percentile(50))},
          {"p90_ms", round3(percentile(90))},
          {"p99_ms", round3(percentile(99))},
          {"max_ms", round3(percentile(100))},
          {"mean_ms", round3(samples_.empty() ? 0 : sum / static_cast<double>(samples_.size()))}};
}

std::uint64_t PhaseResult::total_ok() const {
  std::uint64_t n = 0;
  for (const auto& [op, s] : ops) n += s.ok;
  return n;
}

std::uint64_t PhaseResult::total_errors() const {
  std::uint64_t n = 0;
  for (const auto& [op, s] : ops) {
    for (const auto& [kind, count] : s.errors) n += count;
  }
  return n;
}

json PhaseResult::to_json() const {
  json j;
  j["phase"] = name;
  j["seconds"] = std::round(seconds * 1e6) / 1e6;
  j["ok"] = total_ok();
  j["errors"] = total_errors();
  j["throughput_per_second"] =
      seconds > 0 ? std::round(static_cast<double>(total_ok()) / seconds * 10) / 10 : 0.0;
  json ops_json = json::object();
  for (const auto& [op, s] : ops) {
    json o = s.latency.summary();
    o["ok"] = s.ok;
    o["errors"] = s.errors;
    ops_json[op] = o;
  }
  j["ops"] = ops_json;
  return j;
}

// ---------------------------------------------------------------------------------------------
// Connections

namespace {

double ms_since(std::uint64_t t0_ns) { return static_cast<double>(uv_hrtime() - t0_ns) / 1e6; }

// The kind of a failed answer, short enough to group by: the status and the start of Err.
std::string error_kind(int status, const std::string& body) {
  json parsed = json::parse(body, nullptr, /*allow_exceptions=*/false);
  std::string err;
  if (parsed.is_object() && parsed.contains("Err") && parsed["Err"].is_string()) {
    err = parsed["Err"].get<std::string>();
  }
  if (err.empty() && status >= 200 && status < 300) return {};
  if (err.empty()) err = body.substr(0, 60);
  // Layer ids differ per call: keep the message's shape only.
  std::string shape;
  for (std::size_t i = 0; i < err.size() && shape.size() < 80;) {
    if (err.compare(i, 3, "lb-") == 0) {
      shape += "<id>";
      while (i < err.size() && (std::isalnum(static_cast<unsigned char>(err[i])) || err[i] == '-')) ++i;
    } else {
      shape += err[i++];
    }
  }
  return fmt::format("http {}: {}", status, shape);
}

}  // namespace

struct Runner::Conn {
  enum class State { kDisconnected, kConnecting, kIdle, kBusy };

  // The prober runs on the monitor's loop, every other connection on the runner's.
  Conn(Runner& r, uv_loop_t* l, bool prober) : runner(r), loop(l), is_prober(prober) {
    uv_timer_init(loop, &timer);
    timer.data = this;
    uv_timer_init(loop, &retry_timer);
    retry_timer.data = this;
  }

  struct WriteReq {
    uv_write_t req{};
    std::string data;
    Conn* conn = nullptr;
    uv_pipe_t* pipe = nullptr;
  };

  Runner& runner;
  uv_loop_t* loop;
  bool is_prober;
  State state = State::kDisconnected;
  uv_pipe_t* pipe = nullptr;  // heap; freed in its close callback
  uv_connect_t connect_req{};
  uv_timer_t timer{};         // the current call's timeout
  uv_timer_t retry_timer{};   // reconnect back-off
  ResponseParser parser;
  std::optional<Sequence> sequence;
  std::optional<Call> call;
  std::uint64_t t0 = 0;
  bool body_done = true;
  int last_connect_status = 0;
  std::function<void(int status)> on_connected;  // used by start()

  void connect() {
    state = State::kConnecting;
    pipe = new uv_pipe_t;
    uv_pipe_init(loop, pipe, 0);
    pipe->data = this;
    connect_req.data = this;
    uv_pipe_connect(&connect_req, pipe, runner.options_.socket.c_str(), &Conn::on_connect);
  }

  static void on_close(uv_handle_t* handle) { delete reinterpret_cast<uv_pipe_t*>(handle); }

  void drop_pipe() {
    if (pipe != nullptr) {
      uv_close(reinterpret_cast<uv_handle_t*>(pipe), &Conn::on_close);
      pipe = nullptr;
    }
    state = State::kDisconnected;
  }

  static void on_connect(uv_connect_t* req, int status) {
    auto* c = static_cast<Conn*>(req->data);
    c->last_connect_status = status;
    if (status < 0) {
      c->drop_pipe();
      if (c->on_connected) {
        c->on_connected(status);
        return;
      }
      // During a phase: the sequence this connection holds cannot run; fail it so the phase
      // ends, then retry the connection a little later.
      c->abandon_sequence(fmt::format("connect: {}", uv_err_name(status)));
      uv_timer_start(&c->retry_timer, &Conn::on_retry, 100, 0);
      if (!c->is_prober) c->runner.maybe_finish_phase();
      return;
    }
    c->state = State::kIdle;
    uv_read_start(reinterpret_cast<uv_stream_t*>(c->pipe), &Conn::on_alloc, &Conn::on_read);
    if (c->on_connected) {
      c->on_connected(0);
      return;
    }
    if (!c->is_prober) c->runner.dispatch();
  }

  static void on_retry(uv_timer_t* t) {
    auto* c = static_cast<Conn*>(t->data);
    if (c->state == State::kDisconnected && !c->runner.stopping_) c->connect();
  }

  void abandon_sequence(const std::string& why) {
    if (!sequence) return;
    while (auto next = (*sequence)()) {
      Outcome o;
      o.error = why;
      Call abandoned = std::move(*next);
      runner.on_call_done(*this, abandoned, std::move(o));
    }
    sequence.reset();
  }

  static void on_alloc(uv_handle_t*, size_t suggested, uv_buf_t* buf) {
    static thread_local char storage[256 * 1024];
    (void)suggested;
    *buf = uv_buf_init(storage, sizeof(storage));
  }

  static void on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf) {
    auto* c = static_cast<Conn*>(stream->data);
    if (reinterpret_cast<uv_pipe_t*>(stream) != c->pipe) return;
    if (nread > 0) {
      if (c->state != State::kBusy) {
        // Bytes without a request: the stream is out of step; start afresh.
        c->drop_pipe();
        c->connect();
        return;
      }
      try {
        (void)c->parser.feed(std::string_view(buf->base, static_cast<std::size_t>(nread)));
      } catch (const HttpError& e) {
        c->fail("protocol");
        return;
      }
      if (c->parser.complete()) c->complete();
      return;
    }
    if (nread == 0) return;
    if (c->state != State::kBusy) {
      // The server closed an idle connection (idle timeout): reconnect quietly.
      c->drop_pipe();
      if (!c->runner.stopping_) c->connect();
      return;
    }
    if (nread == UV_EOF) {
      try {
        c->parser.finish();
      } catch (const HttpError&) {
        c->fail("closed");
        return;
      }
      c->complete();
      return;
    }
    c->fail(fmt::format("read: {}", uv_err_name(static_cast<int>(nread))));
  }

  void start(Call next) {
    call = std::move(next);
    state = State::kBusy;
    parser.reset();
    t0 = uv_hrtime();
    if (runner.options_.timeout_seconds > 0) {
      uv_timer_start(&timer, &Conn::on_timeout,
                     static_cast<std::uint64_t>(runner.options_.timeout_seconds * 1000), 0);
    }
    call->request.chunked = static_cast<bool>(call->body);
    body_done = !call->body;
    write(call->body ? layerd::tools::serialize_head(call->request)
                     : layerd::tools::serialize(call->request));
  }

  void write(std::string data) {
    auto* w = new WriteReq;
    w->data = std::move(data);
    w->conn = this;
    w->pipe = pipe;
    w->req.data = w;
    uv_buf_t b = uv_buf_init(w->data.data(), static_cast<unsigned>(w->data.size()));
    int rc = uv_write(&w->req, reinterpret_cast<uv_stream_t*>(pipe), &b, 1, &Conn::on_write);
    if (rc < 0) {
      delete w;
      fail(fmt::format("write: {}", uv_err_name(rc)));
    }
  }

  static void on_write(uv_write_t* req, int status) {
    auto* w = static_cast<WriteReq*>(req->data);
    Conn* c = w->conn;
    bool current = w->pipe == c->pipe;
    delete w;
    if (!current || status == UV_ECANCELED) return;
    if (status < 0) {
      // The server may already have answered (it refuses an upload early): let the read side
      // decide; stop sending.
      c->body_done = true;
      return;
    }
    if (c->state == State::kBusy && !c->body_done && c->call && c->call->body) c->pump();
  }

  // Sends the next chunk of a streamed body; one write in flight at a time keeps memory flat.
  void pump() {
    std::string chunk(256 * 1024, '\0');
    std::size_t n = call->body->read(chunk.data(), chunk.size());
    if (n == 0) {
      body_done = true;
      write(std::string(layerd::tools::kLastChunk));
      return;
    }
    chunk.resize(n);
    write(layerd::tools::encode_chunk(chunk));
  }

  static void on_timeout(uv_timer_t* t) {
    auto* c = static_cast<Conn*>(t->data);
    if (c->state == State::kBusy) c->fail("timeout");
  }

  void complete() {
    uv_timer_stop(&timer);
    Outcome o;
    o.ms = ms_since(t0);
    o.status = parser.status();
    o.body = parser.take_body();
    o.error = error_kind(o.status, o.body);
    o.ok = o.error.empty();
    bool keep = parser.keep_alive();
    Call done = std::move(*call);
    call.reset();
    if (keep) {
      state = State::kIdle;
    } else {
      drop_pipe();
      connect();
    }
    runner.on_call_done(*this, done, std::move(o));
  }

  void fail(const std::string& kind) {
    uv_timer_stop(&timer);
    Outcome o;
    o.ms = ms_since(t0);
    o.error = kind;
    Call done = std::move(*call);
    call.reset();
    drop_pipe();
    if (!runner.stopping_) connect();
    runner.on_call_done(*this, done, std::move(o));
  }
};

// ---------------------------------------------------------------------------------------------
// Runner

Runner::Runner(Options options) : options_(std::move(options)) {
  uv_loop_init(&loop_);
  uv_timer_init(&loop_, &tick_timer_);
  tick_timer_.data = this;
}

Runner::~Runner() { stop(); }

void Runner::start() {
  started_ns_ = uv_hrtime();
  int pending = options_.connections;
  int failed_status = 0;
  auto connected = [&](int status) {
    if (status < 0) failed_status = status;
    if (--pending == 0) uv_stop(&loop_);
  };
  for (int i = 0; i < options_.connections; ++i) {
    conns_.push_back(std::make_unique<Conn>(*this, &loop_, false));
    conns_.back()->on_connected = connected;
    conns_.back()->connect();
  }
  if (pending > 0) uv_run(&loop_, UV_RUN_DEFAULT);
  for (auto& c : conns_) c->on_connected = nullptr;
  if (failed_status < 0) {
    throw HttpError(layerd::tools::HttpErrorKind::kConnect,
                    fmt::format("cannot connect to {}: {}", options_.socket,
                                uv_strerror(failed_status)));
  }
  if (options_.pid > 0) {
    pid_ = options_.pid;
  } else if (!conns_.empty()) {
    // The daemon is the socket's peer.
    uv_os_fd_t fd = -1;
    if (uv_fileno(reinterpret_cast<uv_handle_t*>(conns_.front()->pipe), &fd) == 0) {
      ucred cred{};
      socklen_t len = sizeof(cred);
      if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) pid_ = cred.pid;
    }
  }
  start_monitor();
}

// The prober and the sampler run on a thread and a loop of their own: a health probe is answered
// as soon as layerd answers, not when the load's loop gets round to it (with 1,000 connections
// busy it may be milliseconds later), and reading /proc/PID/fd of a daemon holding thousands of
// descriptors does not stall the load.
void Runner::start_monitor() {
  bool probing = options_.health_interval_ms > 0;
  bool sampling = options_.sample_interval_ms > 0 && pid_ > 0;
  if (!probing && !sampling) return;
  uv_loop_init(&monitor_loop_);
  uv_async_init(&monitor_loop_, &monitor_stop_, &Runner::on_monitor_stop);
  monitor_stop_.data = this;
  uv_timer_init(&monitor_loop_, &sample_timer_);
  uv_timer_init(&monitor_loop_, &probe_timer_);
  sample_timer_.data = probe_timer_.data = this;
  if (sampling) {
    sample();
    auto every = static_cast<std::uint64_t>(options_.sample_interval_ms);
    uv_timer_start(&sample_timer_, &Runner::on_sample_timer, every, every);
  }
  if (probing) {
    prober_ = std::make_unique<Conn>(*this, &monitor_loop_, true);
    prober_->connect();
    auto every = static_cast<std::uint64_t>(std::max(1.0, options_.health_interval_ms));
    uv_timer_start(&probe_timer_, &Runner::on_probe_timer, every, every);
  }
  monitor_ = std::thread([this] {
    const auto self = static_cast<id_t>(::gettid());  // PRIO_PROCESS + a tid: this thread only
    (void)::setpriority(PRIO_PROCESS, self, options_.monitor_nice);
    errno = 0;
    int nice = ::getpriority(PRIO_PROCESS, self);
    monitor_nice_ = errno == 0 ? nice : 0;
    uv_run(&monitor_loop_, UV_RUN_DEFAULT);
  });
}

void Runner::on_monitor_stop(uv_async_t* async) {
  auto* r = static_cast<Runner*>(async->data);
  auto close_handle = [](uv_handle_t* h) {
    if (!uv_is_closing(h)) uv_close(h, nullptr);
  };
  close_handle(reinterpret_cast<uv_handle_t*>(&r->sample_timer_));
  close_handle(reinterpret_cast<uv_handle_t*>(&r->probe_timer_));
  if (r->prober_) {
    r->prober_->drop_pipe();
    close_handle(reinterpret_cast<uv_handle_t*>(&r->prober_->timer));
    close_handle(reinterpret_cast<uv_handle_t*>(&r->prober_->retry_timer));
  }
  close_handle(reinterpret_cast<uv_handle_t*>(async));
}

void Runner::stop() {
  if (stopping_ && closed_) return;
  stopping_ = true;
  if (monitor_.joinable()) {
    // The monitor's loop ends once its handles are closed (by on_monitor_stop, on its thread).
    uv_async_send(&monitor_stop_);
    monitor_.join();
    (void)uv_loop_close(&monitor_loop_);
  }
  prober_.reset();
  auto close_handle = [](uv_handle_t* h) {
    if (!uv_is_closing(h)) uv_close(h, nullptr);
  };
  close_handle(reinterpret_cast<uv_handle_t*>(&tick_timer_));
  for (auto& c : conns_) {
    c->drop_pipe();
    close_handle(reinterpret_cast<uv_handle_t*>(&c->timer));
    close_handle(reinterpret_cast<uv_handle_t*>(&c->retry_timer));
  }
  // Let every close callback run before the connections' memory goes.
  uv_run(&loop_, UV_RUN_DEFAULT);
  conns_.clear();
  (void)uv_loop_close(&loop_);
  closed_ = true;
}

void Runner::on_tick(uv_timer_t* timer) {
  auto* r = static_cast<Runner*>(timer->data);
  if (r->phase_ == nullptr || r->phase_->sequences_per_second <= 0) return;
  std::uint64_t now = uv_hrtime();
  r->tokens_ += static_cast<double>(now - r->last_token_ns_) / 1e9 * r->phase_->sequences_per_second;
  // No bursts after a stall: at most one second's worth waits.
  r->tokens_ = std::min(r->tokens_, std::max(1.0, r->phase_->sequences_per_second));
  r->last_token_ns_ = now;
  r->dispatch();
}

void Runner::on_sample_timer(uv_timer_t* timer) { static_cast<Runner*>(timer->data)->sample(); }
void Runner::on_probe_timer(uv_timer_t* timer) { static_cast<Runner*>(timer->data)->probe(); }

void Runner::sample() {
  ResourceSample s;
  s.t = static_cast<double>(uv_hrtime() - started_ns_) / 1e9;
  std::ifstream status(fmt::format("/proc/{}/status", pid_));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      s.rss_bytes = std::strtoull(line.c_str() + 6, nullptr, 10) * 1024;
      break;
    }
  }
  if (DIR* d = ::opendir(fmt::format("/proc/{}/fd", pid_).c_str())) {
    while (dirent* e = ::readdir(d)) {
      if (e->d_name[0] != '.') ++s.fds;
    }
    ::closedir(d);
  }
  if (s.rss_bytes > 0) samples_.push_back(s);
}

void Runner::probe() {
  if (!prober_ || prober_->state != Conn::State::kIdle) return;
  Call c;
  c.op = "health";
  c.request.method = "GET";
  c.request.target = "/v1/health";
  prober_->start(std::move(c));
}

void Runner::on_call_done(Conn& conn, Call& call, Outcome outcome) {
  if (conn.is_prober) {
    if (outcome.ok) {
      ++health_.ok;
      health_.latency.add(outcome.ms);
    } else {
      ++health_.errors[outcome.error];
    }
    return;
  }
  if (result_ != nullptr) {
    OpStats& s = result_->ops[call.op];
    if (outcome.ok) {
      ++s.ok;
      s.latency.add(outcome.ms);
    } else {
      ++s.errors[outcome.error];
    }
  }
  if (call.done) call.done(outcome);
  if (!stopping_) dispatch();
}

void Runner::dispatch() {
  if (in_dispatch_) {
    redispatch_ = true;
    return;
  }
  in_dispatch_ = true;
  do {
    redispatch_ = false;
    for (auto& conn : conns_) {
      Conn& c = *conn;
      while (c.state == Conn::State::kIdle) {
        if (!c.sequence) {
          if (phase_ == nullptr || phase_exhausted_) break;
          bool limited = phase_->sequences_per_second > 0;
          if (limited && tokens_ < 1) break;
          std::optional<Sequence> next = phase_->next();
          if (!next) {
            phase_exhausted_ = true;
            break;
          }
          if (limited) tokens_ -= 1;
          c.sequence = std::move(next);
        }
        std::optional<Call> call = (*c.sequence)();
        if (!call) {
          c.sequence.reset();
          continue;
        }
        c.start(std::move(*call));
      }
    }
  } while (redispatch_);
  in_dispatch_ = false;
  maybe_finish_phase();
}

void Runner::maybe_finish_phase() {
  if (phase_ == nullptr || !phase_exhausted_ || work_pending_ > 0) return;
  for (const auto& c : conns_) {
    if (c->sequence || c->state == Conn::State::kBusy) return;
  }
  uv_stop(&loop_);
}

PhaseResult Runner::run_phase(const PhaseSpec& spec) {
  PhaseResult result;
  result.name = spec.name;
  phase_ = &spec;
  result_ = &result;
  phase_exhausted_ = false;
  tokens_ = spec.sequences_per_second > 0 ? 1 : 0;
  last_token_ns_ = uv_hrtime();
  if (spec.sequences_per_second > 0) uv_timer_start(&tick_timer_, &Runner::on_tick, 5, 5);
  std::uint64_t t0 = uv_hrtime();
  dispatch();
  uv_run(&loop_, UV_RUN_DEFAULT);
  result.seconds = static_cast<double>(uv_hrtime() - t0) / 1e9;
  uv_timer_stop(&tick_timer_);
  phase_ = nullptr;
  result_ = nullptr;
  return result;
}

namespace {

struct WorkItem {
  uv_work_t req{};
  Runner* runner = nullptr;
  std::function<std::string()> job;
  std::string error;
  double ms = 0;
  std::function<void(WorkItem&)> after;
};

void work_run(uv_work_t* req) {
  auto* w = static_cast<WorkItem*>(req->data);
  std::uint64_t t0 = uv_hrtime();
  try {
    w->error = w->job();
  } catch (const std::exception& e) {
    w->error = e.what();
  }
  w->ms = ms_since(t0);
}

void work_after(uv_work_t* req, int status) {
  auto* w = static_cast<WorkItem*>(req->data);
  if (status < 0 && w->error.empty()) w->error = uv_err_name(status);
  w->after(*w);
  delete w;
}

}  // namespace

PhaseResult Runner::run_work(const std::string& name, const std::string& op,
                             std::vector<std::function<std::string()>> jobs) {
  PhaseResult result;
  result.name = name;
  if (jobs.empty()) return result;
  work_pending_ = static_cast<int>(jobs.size());
  std::uint64_t t0 = uv_hrtime();
  for (auto& job : jobs) {
    auto* w = new WorkItem;
    w->req.data = w;
    w->runner = this;
    w->job = std::move(job);
    w->after = [this, &result, &op](WorkItem& item) {
      OpStats& s = result.ops[op];
      if (item.error.empty()) {
        ++s.ok;
        s.latency.add(item.ms);
      } else {
        ++s.errors[item.error];
      }
      if (--work_pending_ == 0) uv_stop(&loop_);
    };
    uv_queue_work(&loop_, &w->req, &work_run, &work_after);
  }
  uv_run(&loop_, UV_RUN_DEFAULT);
  result.seconds = static_cast<double>(uv_hrtime() - t0) / 1e9;
  return result;
}

}  // namespace layerbench
