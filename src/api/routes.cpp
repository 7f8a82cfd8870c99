// The routes: Docker's graphdriver plugin calls (POST, JSON in and out, Diff and ApplyDiff as
// raw tar streams) and layerd's native GET routes.
#include <array>
#include <chrono>
#include <string_view>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "internal.hpp"

namespace layerd::api {

namespace {

using nlohmann::json;

constexpr std::string_view kPluginType = "application/vnd.docker.plugins.v1+json";
constexpr std::string_view kJsonType = "application/json";

std::string dump(const json& j) {
  // Paths and driver messages may hold bytes that are not UTF-8: replace them rather than fail.
  return j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
}

Response plugin_json(const json& j) { return Response{200, std::string(kPluginType), dump(j)}; }

Response native_json(const json& j) { return Response{200, std::string(kJsonType), dump(j)}; }

enum class Call {
  kActivate, kInit, kCreate, kCreateReadWrite, kRemove, kGet, kPut, kExists, kStatus,
  kGetMetadata, kCleanup, kCapabilities, kApplyDiff, kDiff, kChanges, kDiffSize,
};

struct PluginRoute {
  std::string_view path;
  Call call;
};

constexpr std::array<PluginRoute, 16> kPluginRoutes = {{
    {"/Plugin.Activate", Call::kActivate},
    {"/GraphDriver.Init", Call::kInit},
    {"/GraphDriver.Create", Call::kCreate},
    {"/GraphDriver.CreateReadWrite", Call::kCreateReadWrite},
    {"/GraphDriver.Remove", Call::kRemove},
    {"/GraphDriver.Get", Call::kGet},
    {"/GraphDriver.Put", Call::kPut},
    {"/GraphDriver.Exists", Call::kExists},
    {"/GraphDriver.Status", Call::kStatus},
    {"/GraphDriver.GetMetadata", Call::kGetMetadata},
    {"/GraphDriver.Cleanup", Call::kCleanup},
    {"/GraphDriver.Capabilities", Call::kCapabilities},
    {"/GraphDriver.ApplyDiff", Call::kApplyDiff},
    {"/GraphDriver.Diff", Call::kDiff},
    {"/GraphDriver.Changes", Call::kChanges},
    {"/GraphDriver.DiffSize", Call::kDiffSize},
}};

enum class Native { kHealth, kLayers, kMetrics, kEvents };
struct NativeRoute {
  std::string_view path;
  Native route;
};
constexpr std::array<NativeRoute, 4> kNativeRoutes = {{
    {"/v1/health", Native::kHealth},
    {"/v1/layers", Native::kLayers},
    {"/metrics", Native::kMetrics},
    {"/v1/events", Native::kEvents},
}};

// A request body parsed as a JSON object ({} when empty).
json parse_object(const std::string& body) {
  if (body.find_first_not_of(" \t\r\n") == std::string::npos) return json::object();
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded()) throw HttpError(400, "malformed JSON in the request body");
  if (!j.is_object()) throw HttpError(400, "the request body must be a JSON object");
  return j;
}

std::string string_field(const json& j, const char* name) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return {};
  if (!it->is_string()) throw HttpError(400, fmt::format("field {} must be a string", name));
  return it->get<std::string>();
}

std::vector<std::string> string_list(const json& j, const char* name) {
  std::vector<std::string> out;
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return out;
  if (!it->is_array()) throw HttpError(400, fmt::format("field {} must be a list", name));
  for (const json& v : *it) {
    if (!v.is_string()) throw HttpError(400, fmt::format("field {} must hold strings", name));
    out.push_back(v.get<std::string>());
  }
  return out;
}

std::map<std::string, std::string> string_map(const json& j, const char* name) {
  std::map<std::string, std::string> out;
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return out;
  if (!it->is_object()) throw HttpError(400, fmt::format("field {} must be an object", name));
  for (const auto& [k, v] : it->items()) {
    if (!v.is_string()) throw HttpError(400, fmt::format("field {} must map to strings", name));
    out.emplace(k, v.get<std::string>());
  }
  return out;
}

std::vector<driver::IdMap> id_maps(const json& j, const char* name) {
  std::vector<driver::IdMap> out;
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return out;
  if (!it->is_array()) throw HttpError(400, fmt::format("field {} must be a list", name));
  for (const json& m : *it) {
    auto number = [&](const char* key) -> std::uint32_t {
      auto f = m.is_object() ? m.find(key) : m.end();
      if (!m.is_object() || f == m.end() || !f->is_number_unsigned() ||
          f->get<std::uint64_t>() > 0xffffffffULL)
        throw HttpError(400, fmt::format("field {} needs {} as an unsigned 32-bit number", name,
                                         key));
      return static_cast<std::uint32_t>(f->get<std::uint64_t>());
    };
    out.push_back(driver::IdMap{number("container_id"), number("host_id"), number("size")});
  }
  return out;
}

// Diff's answer: the tar stream as a chunked body, started on the first byte so that a
// failure before it can still be answered as JSON.
class ChunkedBodySink final : public archive::ByteSink {
 public:
  explicit ChunkedBodySink(Connection& conn) : conn_(conn) {}
  core::Task<void> write(std::span<const std::byte> data) override {
    if (data.empty()) co_return;
    if (!started_) {
      started_ = true;
      co_await conn_.begin_chunked(200, "application/x-tar");
    }
    co_await conn_.send_chunk(data);
  }
  [[nodiscard]] bool started() const noexcept { return started_; }

 private:
  Connection& conn_;
  bool started_ = false;
};

// ApplyDiff's request body as a byte stream, pulled from the socket through the parser.
class RequestBodySource final : public archive::ByteSource {
 public:
  explicit RequestBodySource(Connection& conn) : conn_(conn) {}
  core::Task<std::size_t> read(std::span<std::byte> buf) override {
    co_return co_await conn_.read_body(buf);
  }

 private:
  Connection& conn_;
};

core::Task<Response> diff_call(Connection& conn, json req) {
  driver::Driver& d = conn.server().driver;
  ChunkedBodySink sink(conn);
  std::string error;
  try {
    co_await d.diff(string_field(req, "ID"), string_field(req, "Parent"), sink);
  } catch (const HttpError&) {
    throw;
  } catch (const std::exception& e) {
    spdlog::warn("{} failed: {}", conn.request().target, e.what());
    if (sink.started()) throw;  // run() closes the connection: the tar is incomplete
    error = e.what();
  }
  if (!error.empty()) {
    // Not 200: dockerd would read a 200 body as the tar stream. With 500 it reports the
    // message as "GraphDriver.Diff: message".
    co_return Response{500, std::string(kPluginType), json_error(error)};
  }
  if (!sink.started()) co_await conn.begin_chunked(200, "application/x-tar");
  co_await conn.finish_chunks();
  Response r;
  r.sent = true;
  co_return r;
}

core::Task<Response> plugin_call(Connection& conn, Call call) {
  driver::Driver& d = conn.server().driver;
  if (call == Call::kApplyDiff) {
    const Request& r = conn.request();
    std::string id = r.query_param("id");
    std::string parent = r.query_param("parent");
    RequestBodySource source(conn);
    json out;
    try {
      std::uint64_t size = co_await d.apply_diff(std::move(id), std::move(parent), source);
      out = {{"Size", size}, {"Err", ""}};
    } catch (const HttpError&) {
      throw;
    } catch (const std::exception& e) {
      spdlog::warn("{} failed: {}", r.target, e.what());
      out = {{"Size", 0}, {"Err", e.what()}};
    }
    co_return plugin_json(out);
  }

  json req = parse_object(co_await conn.read_small_body());
  if (call == Call::kDiff) co_return co_await diff_call(conn, std::move(req));

  json out = json::object();
  try {
    switch (call) {
      case Call::kActivate:
        out = {{"Implements", {"GraphDriver"}}};
        break;
      case Call::kInit: {
        driver::InitRequest init;
        init.home = string_field(req, "Home");
        init.options = string_list(req, "Opts");
        init.uid_maps = id_maps(req, "UIDMaps");
        init.gid_maps = id_maps(req, "GIDMaps");
        co_await d.init(std::move(init));
        out = {{"Err", ""}};
        break;
      }
      case Call::kCreate:
      case Call::kCreateReadWrite: {
        driver::CreateRequest create;
        create.id = string_field(req, "ID");
        create.parent = string_field(req, "Parent");
        create.mount_label = string_field(req, "MountLabel");
        create.storage_opt = string_map(req, "StorageOpt");
        create.read_write = call == Call::kCreateReadWrite;
        co_await d.create(std::move(create));
        out = {{"Err", ""}};
        break;
      }
      case Call::kRemove:
        co_await d.remove(string_field(req, "ID"));
        out = {{"Err", ""}};
        break;
      case Call::kGet: {
        std::string dir =
            co_await d.get(string_field(req, "ID"), string_field(req, "MountLabel"));
        out = {{"Dir", dir}, {"Err", ""}};
        break;
      }
      case Call::kPut:
        co_await d.put(string_field(req, "ID"));
        out = {{"Err", ""}};
        break;
      case Call::kExists: {
        bool exists = co_await d.exists(string_field(req, "ID"));
        out = {{"Exists", exists}};
        break;
      }
      case Call::kStatus: {
        json pairs = json::array();
        for (auto& [key, value] : co_await d.status()) pairs.push_back({key, value});
        out = {{"Status", pairs}};
        break;
      }
      case Call::kGetMetadata: {
        auto metadata = co_await d.metadata(string_field(req, "ID"));
        out = {{"Metadata", metadata}, {"Err", ""}};
        break;
      }
      case Call::kCleanup:
        co_await d.cleanup();
        out = {{"Err", ""}};
        break;
      case Call::kCapabilities:
        // Diff output is rebuilt from the upper directory, not the bytes ApplyDiff received.
        out = {{"Capabilities", {{"ReproducesExactDiffs", false}}}};
        break;
      case Call::kChanges: {
        json changes = json::array();
        for (const auto& change :
             co_await d.changes(string_field(req, "ID"), string_field(req, "Parent")))
          changes.push_back({{"Path", change.path}, {"Kind", change.kind}});
        out = {{"Changes", changes}, {"Err", ""}};
        break;
      }
      case Call::kDiffSize: {
        std::uint64_t size =
            co_await d.diff_size(string_field(req, "ID"), string_field(req, "Parent"));
        out = {{"Size", size}, {"Err", ""}};
        break;
      }
      case Call::kApplyDiff:
      case Call::kDiff:
        break;  // handled above
    }
  } catch (const HttpError&) {
    throw;
  } catch (const std::exception& e) {
    // Exists answers false for what cannot exist; anything else failing is worth a line.
    if (call != Call::kExists) spdlog::warn("{} failed: {}", conn.request().target, e.what());
    // Status 200: dockerd then reports the driver's message as it is.
    out = {{"Err", e.what()}};
    if (call == Call::kExists) out["Exists"] = false;
  }
  co_return plugin_json(out);
}

json layer_json(const driver::LayerInfo& l) {
  return {{"id", l.id},          {"parent", l.parent},         {"mounted", l.mounted},
          {"refcount", l.refcount}, {"server_pid", l.server_pid}, {"state", l.state},
          {"last_error", l.last_error}};
}

void on_driver_event(EventQueue* queue, const driver::Event& e) {
  if (queue->overflowed) return;
  if (queue->lines.size() >= queue->limit) {
    // The client reads too slowly: drop it rather than buffer without bound.
    queue->overflowed = true;
    queue->lines.clear();
  } else {
    json j = {{"time", e.time}, {"type", e.type}, {"layer", e.layer}, {"detail", e.detail}};
    queue->lines.push_back(dump(j));
  }
  queue->ready.set();
}

core::Task<Response> events_stream(Connection& conn) {
  Server::Impl& s = conn.server();
  EventQueue queue;
  queue.limit = s.config.event_queue_limit;
  std::uint64_t subscription = s.driver.subscribe(
      [q = &queue](const driver::Event& e) { on_driver_event(q, e); });
  struct Unsubscribe {
    driver::Driver& d;
    std::uint64_t id;
    ~Unsubscribe() { d.unsubscribe(id); }
  } unsubscribe{s.driver, subscription};

  co_await conn.begin_chunked(200, "application/x-ndjson");
  while (co_await conn.wait_for_events(queue)) {
    while (!queue.lines.empty()) {
      std::string line = std::move(queue.lines.front());
      queue.lines.pop_front();
      co_await conn.send_chunk(std::as_bytes(std::span(line.data(), line.size())));
    }
  }
  Response r;
  r.sent = true;
  if (queue.overflowed) {
    ++s.stats.dropped_event_clients;
    spdlog::warn("dropped a /v1/events client: more than {} events queued",
                 s.config.event_queue_limit);
    r.close = true;  // closing without the last chunk tells the client it missed events
  } else {
    try {
      co_await conn.finish_chunks();
    } catch (const std::exception&) {
    }
    r.close = true;
  }
  co_return r;
}

core::Task<Response> native_call(Connection& conn, Native route) {
  Server::Impl& s = conn.server();
  switch (route) {
    case Native::kHealth: {
      double uptime =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - s.started).count();
      co_return native_json({{"status", "ok"},
                             {"version", LAYERD_VERSION},
                             {"uptime_seconds", uptime},
                             {"active_mounts", s.driver.active_mounts()},
                             {"connections", s.stats.open_connections}});
    }
    case Native::kLayers: {
      json layers = json::array();
      for (const auto& layer : s.driver.layers()) layers.push_back(layer_json(layer));
      co_return native_json({{"layers", layers}});
    }
    case Native::kMetrics:
      co_return Response{200, "text/plain; version=0.0.4", s.render_metrics()};
    case Native::kEvents:
      co_return co_await events_stream(conn);
  }
  co_return Response{404, std::string(kJsonType), json_error("no such route")};
}

}  // namespace

core::Task<Response> handle_request(Connection& conn, std::string& route) {
  const Request& r = conn.request();
  for (const auto& p : kPluginRoutes) {
    if (r.path != p.path) continue;
    route = p.path;
    if (r.method != HTTP_POST)
      co_return Response{405, std::string(kPluginType), json_error("use POST for " + r.path)};
    co_return co_await plugin_call(conn, p.call);
  }
  for (const auto& n : kNativeRoutes) {
    if (r.path != n.path) continue;
    route = n.path;
    if (r.method != HTTP_GET)
      co_return Response{405, std::string(kJsonType), json_error("use GET for " + r.path)};
    co_return co_await native_call(conn, n.route);
  }
  co_return Response{404, std::string(kJsonType), json_error("no such route: " + r.path)};
}

}  // namespace layerd::api
