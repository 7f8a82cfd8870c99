// layerctl: the operator's CLI for layerd. It speaks to layerd over its unix socket with the same
// plugin protocol requests dockerd sends (POST /GraphDriver.X) plus layerd's native routes
// (/v1/health, /v1/layers, /v1/events, /metrics). It shares no code with the daemon.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "format.hpp"
#include "http_client.hpp"

using nlohmann::json;
using layerd::tools::HttpError;
using layerd::tools::HttpErrorKind;
using layerd::tools::HttpRequest;
using layerd::tools::HttpResponse;
using layerd::tools::ResponseParser;
using layerd::tools::UnixHttpClient;

namespace layerctl {
namespace {

constexpr const char* kDefaultSocket = "/run/layerd/layerd.sock";

constexpr const char* kExitCodesHelp =
    "Exit codes:\n"
    "  0  success\n"
    "  1  negative answer (exists: the layer does not exist)\n"
    "  2  usage error\n"
    "  3  cannot connect to layerd's socket\n"
    "  4  layerd answered with an error (its message is printed on stderr)\n"
    "  5  the exchange failed after connecting (timeout, connection closed, malformed answer)\n"
    "     or a local file could not be read or written\n";

// A failure with its exit code; main() prints it on stderr.
struct Failure {
  int code;
  std::string message;
};

struct Globals {
  std::string socket = kDefaultSocket;
  bool json = false;
  double timeout_seconds = 60;
  bool progress = true;
};

struct LayerArgs {
  std::string id;
  std::string parent;
  std::string mount_label;
  std::vector<std::string> storage_opts;  // key=value
};

std::chrono::milliseconds timeout_of(const Globals& g) {
  return std::chrono::milliseconds(static_cast<long long>(g.timeout_seconds * 1000));
}

Failure failure_of(const HttpError& e, const std::string& socket) {
  switch (e.kind()) {
    case HttpErrorKind::kConnect:
      return {kExitConnect,
              fmt::format("{} (is layerd running? set the socket with --socket or LAYERD_SOCKET)",
                          e.what())};
    default:
      return {kExitIo, fmt::format("talking to layerd at {}: {}", socket, e.what())};
  }
}

void write_all(int fd, std::string_view data, const char* what) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Failure{kExitIo, fmt::format("writing {}: {}", what, std::strerror(errno))};
    data.remove_prefix(static_cast<std::size_t>(n));
  }
}

void print(std::string_view text) { write_all(STDOUT_FILENO, text, "standard output"); }

// Sends one request and returns the answer, turning errors into Failures. With --json the answer
// body goes to stdout as-is, also when it is an error.
HttpResponse call(const Globals& g, const HttpRequest& request) {
  UnixHttpClient client(g.socket, timeout_of(g));
  HttpResponse response;
  try {
    response = client.request(request);
  } catch (const HttpError& e) {
    throw failure_of(e, g.socket);
  }
  if (auto error = answer_error(response.status, response.body)) {
    if (g.json && !response.body.empty()) {
      print(response.body.back() == '\n' ? response.body : response.body + "\n");
    }
    throw Failure{kExitDaemonError, *error};
  }
  return response;
}

json call_json(const Globals& g, const HttpRequest& request, bool print_raw) {
  HttpResponse response = call(g, request);
  json answer;
  try {
    answer = parse_answer(response.body);
  } catch (const std::exception& e) {
    throw Failure{kExitIo, e.what()};
  }
  if (print_raw && g.json) {
    print(response.body.empty() ? std::string("{}\n")
                                : (response.body.back() == '\n' ? response.body : response.body + "\n"));
  }
  return answer;
}

json plugin_call(const Globals& g, std::string_view method, const json& args) {
  return call_json(g, layerd::tools::plugin_request(method, args), /*print_raw=*/true);
}

HttpRequest get_request(std::string target) {
  HttpRequest request;
  request.method = "GET";
  request.target = std::move(target);
  request.headers.emplace_back("Accept", "*/*");
  return request;
}

json layer_body(const LayerArgs& a) {
  json body = layerd::tools::layer_args(a.id, a.parent);
  if (!a.mount_label.empty()) body["MountLabel"] = a.mount_label;
  if (!a.storage_opts.empty()) {
    json opts = json::object();
    for (const auto& kv : a.storage_opts) {
      auto eq = kv.find('=');
      if (eq == std::string::npos || eq == 0) {
        throw Failure{kExitUsage, fmt::format("--storage-opt '{}' is not KEY=VALUE", kv)};
      }
      opts[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    body["StorageOpt"] = opts;
  }
  return body;
}

// ---------------------------------------------------------------------------------------------
// Commands

int cmd_create(const Globals& g, const LayerArgs& a, bool read_write) {
  (void)plugin_call(g, read_write ? "CreateReadWrite" : "Create", layer_body(a));
  return kExitOk;
}

int cmd_simple(const Globals& g, std::string_view method, const std::string& id) {
  (void)plugin_call(g, method, layerd::tools::layer_args(id));
  return kExitOk;
}

int cmd_mount(const Globals& g, const LayerArgs& a) {
  json body = layerd::tools::layer_args(a.id);
  if (!a.mount_label.empty()) body["MountLabel"] = a.mount_label;
  json answer = plugin_call(g, "Get", body);
  if (!g.json) {
    auto dir = answer.find("Dir");
    if (dir == answer.end() || !dir->is_string()) {
      throw Failure{kExitIo, "the daemon's Get answer has no Dir"};
    }
    print(dir->get<std::string>() + "\n");
  }
  return kExitOk;
}

int cmd_exists(const Globals& g, const std::string& id) {
  json answer = plugin_call(g, "Exists", layerd::tools::layer_args(id));
  auto exists = answer.find("Exists");
  if (exists == answer.end() || !exists->is_boolean()) {
    throw Failure{kExitIo, "the daemon's Exists answer has no boolean Exists"};
  }
  bool yes = exists->get<bool>();
  if (!g.json) print(yes ? "yes\n" : "no\n");
  return yes ? kExitOk : kExitNo;
}

int cmd_inspect(const Globals& g, const std::string& id) {
  json answer = plugin_call(g, "GetMetadata", layerd::tools::layer_args(id));
  if (!g.json) print(format_metadata(answer.value("Metadata", json::object())));
  return kExitOk;
}

int cmd_status(const Globals& g) {
  json answer = plugin_call(g, "Status", json::object());
  if (!g.json) print(format_pairs(answer.value("Status", json::array())));
  return kExitOk;
}

int cmd_capabilities(const Globals& g) {
  json answer = plugin_call(g, "Capabilities", json::object());
  if (!g.json) print(format_object(answer.value("Capabilities", json::object())));
  return kExitOk;
}

int cmd_init(const Globals& g, const std::string& home, const std::vector<std::string>& opts) {
  json body = {{"Home", home}, {"Opts", nullptr}, {"UIDMaps", nullptr}, {"GIDMaps", nullptr}};
  if (!opts.empty()) body["Opts"] = opts;
  (void)plugin_call(g, "Init", body);
  return kExitOk;
}

int cmd_changes(const Globals& g, const LayerArgs& a) {
  json answer = plugin_call(g, "Changes", layerd::tools::layer_args(a.id, a.parent));
  if (!g.json) print(format_changes(answer.value("Changes", json::array())));
  return kExitOk;
}

int cmd_diff_size(const Globals& g, const LayerArgs& a) {
  json answer = plugin_call(g, "DiffSize", layerd::tools::layer_args(a.id, a.parent));
  if (!g.json) print(fmt::format("{}\n", answer.value("Size", json(0)).dump()));
  return kExitOk;
}

// Streams the layer's tar to stdout or a file. The output file is created only once the daemon
// answered 200, so a failed Diff leaves no empty file behind.
int cmd_diff(const Globals& g, const LayerArgs& a, const std::string& output) {
  if (output.empty() && ::isatty(STDOUT_FILENO)) {
    throw Failure{kExitUsage, "refusing to write a tar archive to a terminal: use -o FILE or a redirect"};
  }
  UnixHttpClient client(g.socket, timeout_of(g));
  ResponseParser parser;
  int out_fd = -1;
  bool created = false;
  std::optional<Failure> write_failure;
  parser.on_headers([&](ResponseParser& p) {
    if (p.status() != 200) return;  // buffered; interpreted as an error below
    std::string_view type = layerd::tools::find_header(p.headers(), "Content-Type");
    if (type.find("json") != std::string_view::npos) return;  // a 200 {"Err": ...}
    if (output.empty() || output == "-") {
      out_fd = STDOUT_FILENO;
    } else {
      out_fd = ::open(output.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (out_fd < 0) {
        write_failure = Failure{kExitIo, fmt::format("cannot create {}: {}", output, std::strerror(errno))};
        return;
      }
      created = true;
    }
    p.stream_body_to([&](std::string_view bytes) {
      if (write_failure) return;
      try {
        write_all(out_fd, bytes, output.empty() ? "standard output" : output.c_str());
      } catch (const Failure& f) {
        write_failure = f;
      }
    });
  });
  HttpResponse response;
  try {
    response = client.exchange(
        layerd::tools::plugin_request("Diff", layerd::tools::layer_args(a.id, a.parent)), parser);
  } catch (const HttpError& e) {
    if (created) {
      (void)::close(out_fd);
      (void)::unlink(output.c_str());
    }
    throw failure_of(e, g.socket);
  }
  if (created) {
    if (::close(out_fd) != 0 && !write_failure) {
      write_failure = Failure{kExitIo, fmt::format("closing {}: {}", output, std::strerror(errno))};
    }
    if (write_failure) (void)::unlink(output.c_str());
  }
  if (write_failure) throw *write_failure;
  if (out_fd < 0) {
    auto error = answer_error(response.status, response.body);
    if (g.json && !response.body.empty()) print(response.body);
    throw Failure{kExitDaemonError, error.value_or("the daemon answered Diff without a tar stream")};
  }
  return kExitOk;
}

// Streams a tar from a file or stdin as a chunked ApplyDiff body, with a progress line on a
// terminal.
int cmd_apply(const Globals& g, const LayerArgs& a, const std::string& input) {
  int in_fd = STDIN_FILENO;
  bool opened = false;
  std::optional<std::uint64_t> total;
  if (!input.empty() && input != "-") {
    in_fd = ::open(input.c_str(), O_RDONLY | O_CLOEXEC);
    if (in_fd < 0) throw Failure{kExitIo, fmt::format("cannot open {}: {}", input, std::strerror(errno))};
    opened = true;
  } else if (::isatty(STDIN_FILENO)) {
    throw Failure{kExitUsage, "no tar on standard input (it is a terminal): use -i FILE or a pipe"};
  }
  struct stat st{};
  if (::fstat(in_fd, &st) == 0 && S_ISREG(st.st_mode)) total = static_cast<std::uint64_t>(st.st_size);

  bool show_progress = g.progress && ::isatty(STDERR_FILENO);
  auto start = std::chrono::steady_clock::now();
  auto last_draw = start - std::chrono::seconds(1);
  std::uint64_t sent = 0;
  std::optional<Failure> read_failure;
  auto draw = [&](bool final) {
    auto now = std::chrono::steady_clock::now();
    if (!final && now - last_draw < std::chrono::milliseconds(100)) return;
    last_draw = now;
    double seconds = std::chrono::duration<double>(now - start).count();
    std::string line = "\r" + format_progress(sent, total, seconds) + "\033[K";
    if (final) line += "\n";
    (void)!::write(STDERR_FILENO, line.data(), line.size());
  };
  layerd::tools::BodyReader reader = [&](char* buffer, std::size_t size) -> std::size_t {
    for (;;) {
      ssize_t n = ::read(in_fd, buffer, size);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        // Ending the body early makes the tar truncated, so the daemon refuses it; the read error
        // is what we report.
        read_failure = Failure{kExitIo, fmt::format("reading {}: {}",
                                                    opened ? input : std::string("standard input"),
                                                    std::strerror(errno))};
        return 0;
      }
      sent += static_cast<std::uint64_t>(n);
      if (show_progress) draw(false);
      return static_cast<std::size_t>(n);
    }
  };

  UnixHttpClient client(g.socket, timeout_of(g));
  ResponseParser parser;
  HttpRequest request;
  request.method = "POST";
  request.target = layerd::tools::apply_diff_target(a.id, a.parent);
  HttpResponse response;
  try {
    response = client.exchange(request, parser, reader);
  } catch (const HttpError& e) {
    if (opened) (void)::close(in_fd);
    if (show_progress) draw(true);
    throw failure_of(e, g.socket);
  }
  if (opened) (void)::close(in_fd);
  if (show_progress) draw(true);
  if (read_failure) throw *read_failure;
  if (auto error = answer_error(response.status, response.body)) {
    if (g.json && !response.body.empty()) print(response.body);
    throw Failure{kExitDaemonError, *error};
  }
  json answer;
  try {
    answer = parse_answer(response.body);
  } catch (const std::exception& e) {
    throw Failure{kExitIo, e.what()};
  }
  if (g.json) {
    print(response.body.empty() ? std::string("{}\n") : response.body);
  } else {
    print(fmt::format("{}\n", answer.value("Size", json(0)).dump()));
  }
  return kExitOk;
}

int cmd_layers(const Globals& g) {
  json answer = call_json(g, get_request("/v1/layers"), /*print_raw=*/true);
  if (!g.json) print(format_layers(answer));
  return kExitOk;
}

int cmd_health(const Globals& g) {
  json answer = call_json(g, get_request("/v1/health"), /*print_raw=*/true);
  if (!g.json) print(format_object(answer));
  return kExitOk;
}

int cmd_metrics(const Globals& g) {
  HttpResponse response = call(g, get_request("/metrics"));
  if (!g.json) {
    print(response.body);
    return kExitOk;
  }
  // Prometheus text is not JSON: --json gives its samples as a JSON array.
  try {
    print(parse_prometheus(response.body).dump() + "\n");
  } catch (const std::exception& e) {
    throw Failure{kExitIo, e.what()};
  }
  return kExitOk;
}

// Prints each event line as it arrives until the daemon closes the stream or we are interrupted.
int cmd_events(const Globals& g) {
  UnixHttpClient client(g.socket, timeout_of(g));
  ResponseParser parser;
  std::string pending;
  std::optional<Failure> failure;
  parser.on_headers([&](ResponseParser& p) {
    if (p.status() != 200) return;
    // Events may be minutes apart: the idle timeout only guards the connection and the headers.
    client.set_idle_timeout(std::chrono::milliseconds(0));
    p.stream_body_to([&](std::string_view bytes) {
      pending.append(bytes);
      std::size_t start = 0;
      for (std::size_t nl; (nl = pending.find('\n', start)) != std::string::npos; start = nl + 1) {
        std::string_view line(pending.data() + start, nl - start);
        if (line.empty() || failure) continue;
        try {
          if (g.json) {
            print(std::string(line) + "\n");
          } else {
            json event = json::parse(line, nullptr, /*allow_exceptions=*/false);
            print(event.is_discarded() ? std::string(line) + "\n" : format_event(event));
          }
        } catch (const Failure& f) {
          failure = f;
        }
      }
      pending.erase(0, start);
    });
  });
  HttpResponse response;
  try {
    response = client.exchange(get_request("/v1/events"), parser);
  } catch (const HttpError& e) {
    throw failure_of(e, g.socket);
  }
  if (failure) throw *failure;
  if (auto error = answer_error(response.status, response.body)) {
    if (g.json && !response.body.empty()) print(response.body);
    throw Failure{kExitDaemonError, *error};
  }
  return kExitOk;
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"layerctl: control layerd, the fuse-overlayfs layer daemon, over its unix socket."};
  app.name("layerctl");
  app.footer(kExitCodesHelp);
  app.require_subcommand(1);
  // Global flags may come before or after the subcommand.
  app.fallthrough();

  Globals g;
  if (const char* env = std::getenv("LAYERD_SOCKET"); env != nullptr && *env != '\0') g.socket = env;
  app.add_option("-s,--socket", g.socket, "layerd's socket (env LAYERD_SOCKET)")
      ->capture_default_str();
  app.add_flag("--json", g.json,
               "print layerd's JSON answer as-is (metrics: samples as a JSON array)");
  app.add_option("--timeout", g.timeout_seconds,
                 "give up when layerd makes no progress for this many seconds (0: wait forever)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);

  LayerArgs la;
  std::string file;
  std::string home;
  std::vector<std::string> init_opts;
  bool no_progress = false;
  std::function<int()> action;

  auto add_id = [&](CLI::App* sub) {
    sub->add_option("ID", la.id, "layer id")->required();
  };
  auto add_parent = [&](CLI::App* sub, const char* what) {
    sub->add_option("-p,--parent", la.parent, what);
  };

  auto* create = app.add_subcommand("create", "create a read-only layer (Create)");
  add_id(create);
  add_parent(create, "parent layer id");
  create->add_option("--mount-label", la.mount_label, "SELinux mount label");
  create->add_option("--storage-opt", la.storage_opts, "storage option KEY=VALUE (repeatable)");
  create->callback([&] { action = [&] { return cmd_create(g, la, false); }; });

  auto* create_rw = app.add_subcommand("create-rw", "create a read-write container layer (CreateReadWrite)");
  add_id(create_rw);
  add_parent(create_rw, "parent layer id");
  create_rw->add_option("--mount-label", la.mount_label, "SELinux mount label");
  create_rw->add_option("--storage-opt", la.storage_opts, "storage option KEY=VALUE (repeatable)");
  create_rw->callback([&] { action = [&] { return cmd_create(g, la, true); }; });

  auto* rm = app.add_subcommand("rm", "remove a layer (Remove)");
  add_id(rm);
  rm->callback([&] { action = [&] { return cmd_simple(g, "Remove", la.id); }; });

  auto* mount = app.add_subcommand("mount", "mount a layer, or take another reference, and print its directory (Get)");
  add_id(mount);
  mount->add_option("--mount-label", la.mount_label, "SELinux mount label");
  mount->callback([&] { action = [&] { return cmd_mount(g, la); }; });

  auto* umount = app.add_subcommand("umount", "release a reference; the last one unmounts (Put)");
  add_id(umount);
  umount->callback([&] { action = [&] { return cmd_simple(g, "Put", la.id); }; });

  auto* exists = app.add_subcommand("exists", "tell whether a layer exists: exit 0 and 'yes', or exit 1 and 'no' (Exists)");
  add_id(exists);
  exists->callback([&] { action = [&] { return cmd_exists(g, la.id); }; });

  auto* inspect = app.add_subcommand("inspect", "print a layer's metadata (GetMetadata)");
  add_id(inspect);
  inspect->callback([&] { action = [&] { return cmd_inspect(g, la.id); }; });

  auto* status = app.add_subcommand("status", "print the driver's status (Status)");
  status->callback([&] { action = [&] { return cmd_status(g); }; });

  auto* caps = app.add_subcommand("capabilities", "print the driver's capabilities (Capabilities)");
  caps->callback([&] { action = [&] { return cmd_capabilities(g); }; });

  auto* init = app.add_subcommand("init", "initialize the driver with a home directory, as dockerd does at start (Init)");
  init->add_option("HOME", home, "the driver's home directory")->required();
  init->add_option("-o,--opt", init_opts, "driver option (repeatable)");
  init->callback([&] { action = [&] { return cmd_init(g, home, init_opts); }; });

  auto* cleanup = app.add_subcommand("cleanup", "tell the driver dockerd is shutting down (Cleanup)");
  cleanup->callback([&] { action = [&] { return cmd_simple(g, "Cleanup", ""); }; });

  auto* changes = app.add_subcommand("changes", "list the changes of a layer against its parent, as 'A|C|D PATH' (Changes)");
  add_id(changes);
  add_parent(changes, "the layer to compare with (default: none)");
  changes->callback([&] { action = [&] { return cmd_changes(g, la); }; });

  auto* diff = app.add_subcommand("diff", "write a layer's changes as a tar stream to stdout or a file (Diff)");
  add_id(diff);
  add_parent(diff, "the layer to compare with (default: none)");
  diff->add_option("-o,--output", file, "write the tar to FILE instead of stdout");
  diff->callback([&] { action = [&] { return cmd_diff(g, la, file); }; });

  auto* apply = app.add_subcommand("apply", "apply a tar stream from a file or stdin to a layer and print the bytes applied (ApplyDiff)");
  add_id(apply);
  add_parent(apply, "the layer's parent id");
  apply->add_option("-i,--input", file, "read the tar from FILE instead of stdin");
  apply->add_flag("--no-progress", no_progress, "no progress line on stderr even on a terminal");
  apply->callback([&] { action = [&] { return cmd_apply(g, la, file); }; });

  auto* diff_size = app.add_subcommand("diff-size", "print the size in bytes of a layer's changes (DiffSize)");
  add_id(diff_size);
  add_parent(diff_size, "the layer to compare with (default: none)");
  diff_size->callback([&] { action = [&] { return cmd_diff_size(g, la); }; });

  auto* layers = app.add_subcommand("layers", "list the layers layerd knows with mount state, references and FUSE server pid (GET /v1/layers)");
  layers->callback([&] { action = [&] { return cmd_layers(g); }; });

  auto* events = app.add_subcommand("events", "print mount, unmount and failure events as they happen, until interrupted (GET /v1/events)");
  events->callback([&] { action = [&] { return cmd_events(g); }; });

  auto* metrics = app.add_subcommand("metrics", "print layerd's metrics in Prometheus text format (GET /metrics)");
  metrics->callback([&] { action = [&] { return cmd_metrics(g); }; });

  auto* health = app.add_subcommand("health", "check that layerd answers (GET /v1/health)");
  health->callback([&] { action = [&] { return cmd_health(g); }; });

  for (auto* sub : app.get_subcommands({})) {
    sub->footer(std::string("Global options (--socket, --json, --timeout) may follow the subcommand.\n\n") +
                kExitCodesHelp);
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  if (!action) return kExitUsage;
  g.progress = !no_progress;
  std::string command = app.get_subcommands().empty() ? "" : app.get_subcommands().front()->get_name();
  try {
    return action();
  } catch (const Failure& f) {
    std::cerr << "layerctl " << command << ": " << f.message << "\n";
    return f.code;
  } catch (const std::exception& e) {
    std::cerr << "layerctl " << command << ": " << e.what() << "\n";
    return kExitIo;
  }
}

}  // namespace layerctl

int main(int argc, char** argv) { return layerctl::run(argc, argv); }
